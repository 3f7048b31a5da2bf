"""Convert OpenAI's DALL-E dVAE pickles (``encoder.pkl``, ``decoder.pkl``) to safetensors, once.

    python conversion/convert_dall_e.py --encoder encoder.pkl --decoder decoder.pkl --out DIR

OpenAI released the dVAE as whole pickled ``nn.Module`` objects. Unpickling runs whatever callables a
file names, and the ``dall_e`` package would have to be importable under that exact module path. This
script is the one place in the project that reads those pickles (see DESIGN.md), and it reads them
through an allow-list unpickler: only the classes and tensor helpers a genuine dVAE pickle uses are
resolved, the ``dall_e`` classes map to parameter-only stand-ins defined here, and anything else is
refused with its ``module.name``. It writes to ``DIR``:

- ``encoder.safetensors``, ``decoder.safetensors``: fp32 state dicts with OpenAI's names (``.w``/``.b``),
  which ``DallETokenizer(weights=DIR)`` loads with ``strict=True``; metadata records the source sha256;
- ``config.json``: the architecture inferred from the shapes, the keyword arguments of ``DallETokenizer``;
- ``SHA256SUMS``: the hash of every written file, for ``sha256sum -c``.

Before anything appears in ``DIR`` the result is checked: the tokenizer built from the new files must
give the same token ids and decoder output as a functional reference computed from the unpickled tensors
(the stand-ins have no ``forward``). Files are written to a hidden folder next to ``DIR`` and renamed
at the end, so a failed run leaves nothing half-written.

Caveat: allow-listed classes still run their ``__setstate__`` (``nn.Module``'s, ``Upsample``'s) while
unpickling. Run the conversion once, offline, on files whose sha256 you recorded, and publish the
safetensors; the package itself never unpickles.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import re
import secrets
import shutil
import sys
import types
import warnings
import zipfile
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from cim_models.hub.folders import check_output_folder, publish_folder
from cim_models.tokenizers.dall_e import DECODER_FILE, ENCODER_FILE, DallETokenizer

CONFIG_FILE = "config.json"
SUMS_FILE = "SHA256SUMS"
GROUP_COUNT = 4  # fixed in OpenAI's code
LOGIT_LAPLACE_EPS = 0.1  # restated, not imported: the check should not trust the code it checks
CHECK_SIZE = 112  # CIM feeds the tokenizer 112x112 views
CHECK_SEED = 0
IMAGE_ATOL = 1e-5  # decoded images in [0, 1]; measured differences are below 1e-6
STATS_TOL = 1e-4  # rtol and atol on the raw decoder statistics, which are unbounded logits
OPENAI_CONFIG = {"n_hid": 256, "n_blk_per_group": 2, "vocab_size": 8192, "n_init": 128}
OPENAI_PARAM_COUNTS = {"encoder": 53_786_240, "decoder": 43_829_766}


class ConversionError(Exception):
    """Anything that makes the conversion stop; the message says what was wrong and what to do."""


# --------------------------------------------------------------------------------------------------
# Stand-ins for the `dall_e` classes. Unpickling a module restores its __dict__ (parameters, child
# modules, attrs fields) through nn.Module.__setstate__, so `.state_dict()` works without OpenAI's code.
# --------------------------------------------------------------------------------------------------


class _StandIn(nn.Module):
    """Holds an unpickled OpenAI module's attributes; has no forward (the reference below computes)."""

    pickled_name = ""


class StandInConv2d(_StandIn):
    pickled_name = "dall_e.utils.Conv2d"


class StandInEncoderBlock(_StandIn):
    pickled_name = "dall_e.encoder.EncoderBlock"


class StandInEncoder(_StandIn):
    pickled_name = "dall_e.encoder.Encoder"


class StandInDecoderBlock(_StandIn):
    pickled_name = "dall_e.decoder.DecoderBlock"


class StandInDecoder(_StandIn):
    pickled_name = "dall_e.decoder.Decoder"


# --------------------------------------------------------------------------------------------------
# The allow-list unpickler
# --------------------------------------------------------------------------------------------------


def _allowed_globals() -> dict[tuple[str, str], object]:
    """Every global a dVAE module pickle may name, mapped to what it resolves to.

    Pickles record classes by their module path, so the torch.nn entries are the paths under which
    torch has defined these layers since before the dVAE release. Storage classes normally never get
    here (torch's own wrapper resolves names containing "Storage" first); they are listed in case it
    stops doing so. Extend this only after reading what the new entry does when called with arbitrary
    arguments.
    """
    allowed: dict[tuple[str, str], object] = {
        ("dall_e.utils", "Conv2d"): StandInConv2d,
        ("dall_e.encoder", "EncoderBlock"): StandInEncoderBlock,
        ("dall_e.encoder", "Encoder"): StandInEncoder,
        ("dall_e.decoder", "DecoderBlock"): StandInDecoderBlock,
        ("dall_e.decoder", "Decoder"): StandInDecoder,
        ("torch.nn.modules.container", "Sequential"): nn.Sequential,
        ("torch.nn.modules.activation", "ReLU"): nn.ReLU,
        ("torch.nn.modules.pooling", "MaxPool2d"): nn.MaxPool2d,
        ("torch.nn.modules.linear", "Identity"): nn.Identity,
        ("torch.nn.modules.upsampling", "Upsample"): nn.Upsample,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,  # nn.Module._non_persistent_buffers_set
        ("torch", "device"): torch.device,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    }
    for name in ("FloatStorage", "HalfStorage", "UntypedStorage"):
        if hasattr(torch, name):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


ALLOWED_GLOBALS = _allowed_globals()


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle named a global outside ALLOWED_GLOBALS; ``.global_name`` is its ``module.name``."""

    def __init__(self, global_name: str):
        self.global_name = global_name
        super().__init__(f"global {global_name} is not allowed")


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only ALLOWED_GLOBALS and never imports anything."""

    def find_class(self, module: str, name: str) -> object:
        # Protocol-2 pickles (torch.save's default) spell builtins the Python 2 way (__builtin__.set);
        # map them as pickle itself does, so the allow-list and the errors use today's names.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobalError(f"{module}.{name}") from None


def _restricted_load(file: io.IOBase, **kwargs) -> object:
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load needs a "pickle module": it subclasses `.Unpickler` (overriding find_class only to map
# storage names, then calling ours) and calls `.load` for the legacy format's header records.
restricted_pickle = types.ModuleType("restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.UnpicklingError = pickle.UnpicklingError


def load_openai_module(data: bytes, expected: type[_StandIn], label: str) -> nn.Module:
    """Unpickle one of OpenAI's module files (zip or legacy torch.save format) through the allow-list.

    ``data`` is the file's bytes, so what is loaded is exactly what was hashed. ``label`` names the
    file in errors.
    """
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if any(
                n == "constants.pkl" or n.endswith("/constants.pkl") for n in archive.namelist()
            ):
                # torch.load hands TorchScript archives to torch.jit.load, bypassing the allow-list.
                raise ConversionError(
                    f"{label} is a TorchScript archive, not a torch.save pickle of OpenAI's module; "
                    "refusing to load it. Use the original encoder.pkl / decoder.pkl."
                )
    try:
        with warnings.catch_warnings():
            # Legacy pickles carry each class's source; ours are stand-ins, so it never matches.
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
            module = torch.load(
                io.BytesIO(data),
                map_location="cpu",
                weights_only=False,  # torch's safe mode cannot read legacy module pickles
                pickle_module=restricted_pickle,  # so the allow-list above does the guarding
            )
    except RefusedGlobalError as err:
        raise ConversionError(
            f"{label}: refused to unpickle the global {err.global_name}: it is not on the allow-list "
            "of DALL-E dVAE classes and tensor helpers, and a genuine OpenAI dVAE pickle does not "
            f"need it. Treat {label} as untrusted: compare its sha256 with the published file. Add "
            f"{err.global_name} to ALLOWED_GLOBALS only after reading what it does."
        ) from err
    except Exception as err:  # any other failure means the file is not a readable torch.save pickle
        raise ConversionError(
            f"{label} could not be read as a torch.save pickle ({type(err).__name__}: {err}). "
            "Pass OpenAI's original encoder.pkl / decoder.pkl."
        ) from err
    if not isinstance(module, expected):
        found = getattr(module, "pickled_name", None) or type(module).__name__
        raise ConversionError(
            f"{label} holds a {found}, expected {expected.pickled_name}. "
            "Did you swap --encoder and --decoder?"
        )
    return module


# --------------------------------------------------------------------------------------------------
# The architecture, inferred from the shapes and checked tensor by tensor
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DallEConfig:
    """The keyword arguments of ``DallETokenizer`` that fix the dVAE's shapes."""

    n_hid: int
    n_blk_per_group: int
    vocab_size: int
    n_init: int


Shapes = dict[str, tuple[int, ...]]


def _conv_shapes(name: str, n_in: int, n_out: int, kernel: int) -> Shapes:
    return {f"{name}.w": (n_out, n_in, kernel, kernel), f"{name}.b": (n_out,)}


def _block_shapes(name: str, n_in: int, n_out: int, kernels: tuple[int, ...]) -> Shapes:
    shapes = _conv_shapes(f"{name}.id_path", n_in, n_out, 1) if n_in != n_out else {}
    widths = (n_in, n_out // 4, n_out // 4, n_out // 4, n_out)
    for j, kernel in enumerate(kernels, start=1):
        shapes |= _conv_shapes(f"{name}.res_path.conv_{j}", widths[j - 1], widths[j], kernel)
    return shapes


def expected_shapes(config: DallEConfig, part: str) -> Shapes:
    """OpenAI's state-dict shapes for ``part`` ("encoder" or "decoder"), restated from dall_e 0.1."""
    n = config.n_hid
    if part == "encoder":
        widths, kernels = (n, n, 2 * n, 4 * n, 8 * n), (3, 3, 3, 1)
        shapes = _conv_shapes("blocks.input", 3, n, 7)
        head = _conv_shapes("blocks.output.conv", 8 * n, config.vocab_size, 1)
    else:
        widths, kernels = (config.n_init, 8 * n, 4 * n, 2 * n, n), (1, 3, 3, 3)
        shapes = _conv_shapes("blocks.input", config.vocab_size, config.n_init, 1)
        head = _conv_shapes("blocks.output.conv", n, 6, 1)
    for g in range(1, GROUP_COUNT + 1):
        for i in range(1, config.n_blk_per_group + 1):
            n_in = widths[g - 1] if i == 1 else widths[g]
            shapes |= _block_shapes(f"blocks.group_{g}.block_{i}", n_in, widths[g], kernels)
    return shapes | head


def _require(state: dict[str, torch.Tensor], key: str, label: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"{label} is not a DALL-E dVAE module: it has no parameter {key}.")
    return state[key]


def infer_config(encoder: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor]) -> DallEConfig:
    """Read n_hid, n_blk_per_group, vocab_size and n_init off the tensor shapes."""
    blocks = [m.group(1) for k in encoder if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))]
    if not blocks:
        raise ConversionError(
            "encoder.pkl has no blocks.group_1.block_* parameters; not a dVAE encoder."
        )
    return DallEConfig(
        n_hid=_require(encoder, "blocks.input.w", "encoder.pkl").shape[0],
        n_blk_per_group=max(int(i) for i in blocks),
        vocab_size=_require(encoder, "blocks.output.conv.w", "encoder.pkl").shape[0],
        n_init=_require(decoder, "blocks.input.w", "decoder.pkl").shape[0],
    )


def check_shapes(
    state: dict[str, torch.Tensor], config: DallEConfig, part: str, label: str
) -> None:
    """Fail, listing the differences, unless ``state`` has exactly OpenAI's names and shapes."""
    expected = expected_shapes(config, part)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [
        f"{k} is {tuple(state[k].shape)}, expected {expected[k]}"
        for k in sorted(expected.keys() & state.keys())
        if tuple(state[k].shape) != expected[k]
    ]
    problems = [
        *(f"missing {k}" for k in missing[:5]),
        *(f"unexpected {k}" for k in unexpected[:5]),
        *wrong[:5],
    ]
    if problems:
        raise ConversionError(
            f"{label} does not match the dVAE {part} with {asdict(config)} inferred from the shapes "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrongly shaped): "
            + "; ".join(problems)
            + ". Check that both files come from the same OpenAI release."
        )


# --------------------------------------------------------------------------------------------------
# A functional reference forward on the raw unpickled tensors: "the pickled module's output"
# --------------------------------------------------------------------------------------------------


def _ref_conv(state: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    w, b = state[f"{name}.w"], state[f"{name}.b"]
    return F.conv2d(x, w, b, padding=(w.shape[-1] - 1) // 2)  # same padding, stride 1


def _ref_block(
    state: dict[str, torch.Tensor], name: str, x: torch.Tensor, post_gain: float
) -> torch.Tensor:
    shortcut = _ref_conv(state, f"{name}.id_path", x) if f"{name}.id_path.w" in state else x
    h = x
    for j in range(1, 5):  # relu, conv_j: the res_path order
        h = _ref_conv(state, f"{name}.res_path.conv_{j}", F.relu(h))
    return shortcut + post_gain * h


@torch.no_grad()
def reference_encoder_logits(
    state: dict[str, torch.Tensor], config: DallEConfig, images: torch.Tensor
) -> torch.Tensor:
    """OpenAI's ``Encoder.forward(map_pixels(images))`` for images in [0, 1]: (B, vocab, H/8, W/8)."""
    post_gain = 1 / (GROUP_COUNT * config.n_blk_per_group) ** 2
    x = _ref_conv(state, "blocks.input", (1 - 2 * LOGIT_LAPLACE_EPS) * images + LOGIT_LAPLACE_EPS)
    for g in range(1, GROUP_COUNT + 1):
        for i in range(1, config.n_blk_per_group + 1):
            x = _ref_block(state, f"blocks.group_{g}.block_{i}", x, post_gain)
        if g < GROUP_COUNT:
            x = F.max_pool2d(x, 2)
    return _ref_conv(state, "blocks.output.conv", F.relu(x))


@torch.no_grad()
def reference_decoder_stats(
    state: dict[str, torch.Tensor], config: DallEConfig, ids: torch.Tensor
) -> torch.Tensor:
    """OpenAI's ``Decoder.forward(one_hot(ids))``: the logit-Laplace statistics (B, 6, 8h, 8w)."""
    post_gain = 1 / (GROUP_COUNT * config.n_blk_per_group) ** 2
    one_hot = F.one_hot(ids, config.vocab_size).permute(0, 3, 1, 2).float()  # (B, vocab, h, w)
    x = _ref_conv(state, "blocks.input", one_hot)
    for g in range(1, GROUP_COUNT + 1):
        for i in range(1, config.n_blk_per_group + 1):
            x = _ref_block(state, f"blocks.group_{g}.block_{i}", x, post_gain)
        if g < GROUP_COUNT:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
    return _ref_conv(state, "blocks.output.conv", F.relu(x))


def reference_decode(stats: torch.Tensor) -> torch.Tensor:
    """OpenAI's reconstruction recipe: unmap_pixels(sigmoid(means)), images in [0, 1]."""
    means = torch.sigmoid(stats[:, :3])
    return torch.clamp((means - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


# --------------------------------------------------------------------------------------------------
# Writing, checking, publishing
# --------------------------------------------------------------------------------------------------


def _converter_name() -> str:
    try:
        return f"cim-models {version('cim-models')} conversion/convert_dall_e.py"
    except PackageNotFoundError:  # run from a checkout: still say which script wrote the files
        return "cim-models conversion/convert_dall_e.py"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class CheckResult:
    n_images: int
    tokens_equal: int
    tokens_total: int
    logits_max_diff: float
    stats_max_diff: float
    image_max_diff: float
    stats_close: bool
    images_close: bool

    @property
    def ok(self) -> bool:
        return self.tokens_equal == self.tokens_total and self.stats_close and self.images_close


def check_converted(
    folder: Path,
    config: DallEConfig,
    encoder_state: dict[str, torch.Tensor],
    decoder_state: dict[str, torch.Tensor],
    n_images: int,
) -> CheckResult:
    """Compare ``DallETokenizer(weights=folder)`` with the reference on the unpickled tensors."""
    tokenizer = DallETokenizer(weights=folder, **asdict(config))  # loads with strict=True
    images = torch.rand(
        n_images, 3, CHECK_SIZE, CHECK_SIZE, generator=torch.Generator().manual_seed(CHECK_SEED)
    )
    ref_logits = reference_encoder_logits(encoder_state, config, images)  # (N, vocab, 14, 14)
    ref_ids = ref_logits.argmax(1)  # (N, 14, 14)
    logits = tokenizer.encode_logits(images)
    ids = tokenizer.encode(images)
    # Decode the reference ids, so a token mismatch does not also show up as a decoder difference.
    ref_stats = reference_decoder_stats(decoder_state, config, ref_ids)  # (N, 6, 112, 112)
    with torch.no_grad():
        stats = tokenizer.decoder.forward_ids(ref_ids)
    decoded = tokenizer.decode(ref_ids)
    ref_decoded = reference_decode(ref_stats)
    return CheckResult(
        n_images=n_images,
        tokens_equal=int((ids == ref_ids).sum()),
        tokens_total=ref_ids.numel(),
        logits_max_diff=float((logits - ref_logits).abs().max()),
        stats_max_diff=float((stats - ref_stats).abs().max()),
        image_max_diff=float((decoded - ref_decoded).abs().max()),
        stats_close=torch.allclose(stats, ref_stats, rtol=STATS_TOL, atol=STATS_TOL),
        images_close=torch.allclose(decoded, ref_decoded, rtol=0, atol=IMAGE_ATOL),
    )


@dataclass
class Source:
    path: Path
    sha256: str
    n_tensors: int
    n_params: int


@dataclass
class ConversionReport:
    out: Path
    config: DallEConfig
    encoder: Source
    decoder: Source
    check: CheckResult
    sums: dict[str, str]
    written: bool = False

    def format(self) -> str:
        lines = []
        for part, src in (("encoder", self.encoder), ("decoder", self.decoder)):
            note = ""
            if asdict(self.config) == OPENAI_CONFIG:
                note = f" (OpenAI's release: {OPENAI_PARAM_COUNTS[part]:,})"
            lines.append(
                f"{part}: {src.path.name} sha256 {src.sha256}\n"
                f"  {src.n_tensors} tensors, {src.n_params:,} params{note}"
            )
        c = self.check
        lines += [
            "architecture: " + ", ".join(f"{k}={v}" for k, v in asdict(self.config).items()),
            f"check on {c.n_images} random {CHECK_SIZE}x{CHECK_SIZE} images:",
            f"  token ids identical: {c.tokens_equal}/{c.tokens_total}",
            f"  encoder logits max |diff|: {c.logits_max_diff:.3g}",
            f"  decoder stats max |diff|: {c.stats_max_diff:.3g} (tolerance {STATS_TOL:g})",
            f"  decoded image max |diff|: {c.image_max_diff:.3g} (tolerance {IMAGE_ATOL:g})",
        ]
        if self.written:
            lines.append(f"wrote {self.out}: " + ", ".join([*sorted(self.sums), SUMS_FILE]))
        return "\n".join(lines)


def _read_source(path: Path, label: str) -> tuple[bytes, str]:
    if not path.is_file():
        raise ConversionError(
            f"--{label} {path} is not a file. Download OpenAI's file (https://cdn.openai.com/dall-e/"
            f"{label}.pkl) once, record its sha256, and pass its path."
        )
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def _state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.state_dict().items()}


def _write_part(folder: Path, part: str, state: dict[str, torch.Tensor], src: Source) -> None:
    tensors = {k: v.to(torch.float32).contiguous().clone() for k, v in state.items()}
    metadata = {
        "format": "pt",
        "tokenizer": "dall-e",
        "part": part,
        "source": src.path.name,
        "source_sha256": src.sha256,
        "converter": _converter_name(),
    }
    path = folder / (ENCODER_FILE if part == "encoder" else DECODER_FILE)
    save_file(tensors, str(path), metadata)
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # safetensors writes 0600; these files are meant to be published


def convert(
    encoder_pkl: str | os.PathLike,
    decoder_pkl: str | os.PathLike,
    out: str | os.PathLike,
    check_images: int = 4,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert, check and publish; raise ConversionError (leaving ``out`` untouched) on any failure."""
    encoder_pkl, decoder_pkl, out = Path(encoder_pkl), Path(decoder_pkl), Path(out)
    if check_images < 1:
        raise ConversionError(f"--check-images must be at least 1, got {check_images}.")
    check_output_folder(out, overwrite, ConversionError)

    sources, states = {}, {}
    for part, path, stand_in in (
        ("encoder", encoder_pkl, StandInEncoder),
        ("decoder", decoder_pkl, StandInDecoder),
    ):
        data, digest = _read_source(path, part)
        states[part] = _state_of(load_openai_module(data, stand_in, f"{part} file {path.name}"))
        del data
        sources[part] = Source(
            path=path,
            sha256=digest,
            n_tensors=len(states[part]),
            n_params=sum(t.numel() for t in states[part].values()),
        )
    config = infer_config(states["encoder"], states["decoder"])
    for part in ("encoder", "decoder"):
        check_shapes(states[part], config, part, f"{part} file {sources[part].path.name}")
    # The reference computes in fp32 on the raw tensors, as OpenAI's code does on CPU.
    ref_states = {p: {k: v.float() for k, v in s.items()} for p, s in states.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        for part in ("encoder", "decoder"):
            _write_part(staging, part, states[part], sources[part])
        config_json = {
            "tokenizer": "dall-e",
            **asdict(config),
            "downsample": DallETokenizer.downsample,
            **{
                part: {
                    "file": ENCODER_FILE if part == "encoder" else DECODER_FILE,
                    "params": src.n_params,
                    "source": src.path.name,
                    "source_sha256": src.sha256,
                }
                for part, src in sources.items()
            },
            "converter": _converter_name(),
        }
        (staging / CONFIG_FILE).write_text(json.dumps(config_json, indent=2) + "\n")
        sums = {
            name: sha256_file(staging / name) for name in (CONFIG_FILE, DECODER_FILE, ENCODER_FILE)
        }
        (staging / SUMS_FILE).write_text("".join(f"{h}  {name}\n" for name, h in sums.items()))

        check = check_converted(
            staging, config, ref_states["encoder"], ref_states["decoder"], check_images
        )
        report = ConversionReport(out, config, sources["encoder"], sources["decoder"], check, sums)
        if not check.ok:
            raise ConversionError(
                "the converted tokenizer does not reproduce the pickled modules; nothing was written.\n"
                + report.format()
                + "\nThis is a bug in the conversion or in cim_models/tokenizers/dall_e.py; "
                "please report it with this output."
            )
        publish_folder(staging, out)
        report.written = True
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert OpenAI's DALL-E dVAE pickles to safetensors for DallETokenizer.",
    )
    parser.add_argument("--encoder", required=True, help="OpenAI's encoder.pkl")
    parser.add_argument("--decoder", required=True, help="OpenAI's decoder.pkl")
    parser.add_argument("--out", required=True, help="output folder (created; must be empty)")
    parser.add_argument(
        "--check-images",
        type=int,
        default=4,
        metavar="N",
        help="random 112x112 images on which to compare with the pickled modules (default: 4)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        report = convert(args.encoder, args.decoder, args.out, args.check_images, args.overwrite)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
