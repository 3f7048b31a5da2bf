"""OpenAI's DALL-E release: reading its pickles safely, converting them once, caching the result.

OpenAI's ``encoder.pkl`` / ``decoder.pkl`` are whole pickled ``nn.Module`` objects, and unpickling
runs whatever a file names. This module reads them in exactly one place, ``load_openai_module``,
through an allow-list unpickler, checks the converted tokenizer against the unpickled modules, and
writes safetensors (``convert_openai_dall_e``, behind ``DallETokenizer(weights="openai")`` and the
``cim-convert-dall-e`` command). Everything else loads safetensors only.
"""

from __future__ import annotations

import _compat_pickle
import collections
import hashlib
import io
import json
import os
import pickle
import tempfile
import types
import warnings
import zipfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import huggingface_hub
import torch
import torch.nn.functional as F
from huggingface_hub import constants
from huggingface_hub.file_download import http_get
from safetensors.torch import save_file
from torch import nn

from .dall_e import (
    CONFIG_FILE,
    CONVERTED_FILES,
    DECODER_FILE,
    ENCODER_FILE,
    OPENAI_URL,
    SUMS_FILE,
    URL_ENV,
    DallETokenizer,
    map_pixels,
    unmap_pixels,
)


def openai_cache_folder() -> Path:
    """Where ``weights="openai"`` keeps the converted release: ``$HF_HOME/cim-models/dall-e``."""
    return Path(constants.HF_HOME) / "cim-models" / "dall-e"


def _is_converted_folder(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (CONFIG_FILE, ENCODER_FILE, DECODER_FILE))


def openai_weights_folder(check_images: int = 2) -> Path:
    """The converted folder of OpenAI's release: the cache, filled on first use.

    The first call downloads ``encoder.pkl`` and ``decoder.pkl`` from ``$CIM_DALL_E_URL``
    (default https://cdn.openai.com/dall-e/), converts them with ``convert_openai_dall_e`` and
    moves the checked result into ``openai_cache_folder()`` in one rename, so a failed or refused
    download leaves nothing cached. Later calls, and every call under ``HF_HUB_OFFLINE=1``, only
    read the cache.
    """
    folder = openai_cache_folder()
    if _is_converted_folder(folder):
        return folder
    base = os.environ.get(URL_ENV) or OPENAI_URL
    manual = (
        f"download encoder.pkl and decoder.pkl from {base} yourself and run "
        f"`cim-convert-dall-e --encoder encoder.pkl --decoder decoder.pkl --out {folder}`"
    )
    if folder.exists() and any(folder.iterdir()):
        raise OSError(
            f"The DALL-E cache folder {folder} holds something other than a converted release. "
            f"Remove it, or fill it yourself: {manual}."
        )
    if huggingface_hub.is_offline_mode():
        raise OSError(
            f"OpenAI's DALL-E weights are not cached in {folder} and HF_HUB_OFFLINE is set, so "
            f"they cannot be downloaded. Unset HF_HUB_OFFLINE for one run, or {manual}."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dall-e-download-", dir=folder.parent) as tmp:
        sources = {}
        for part in ("encoder", "decoder"):
            url = f"{base.rstrip('/')}/{part}.pkl"
            sources[part] = Path(tmp) / f"{part}.pkl"
            try:
                with open(sources[part], "wb") as f:
                    http_get(url, f, displayed_filename=f"{part}.pkl")
            except Exception as err:  # no network, 404, proxy: say where the files can come from
                raise OSError(
                    f"Could not download {url} ({type(err).__name__}: {err}). Check the network "
                    f"or point {URL_ENV} at a folder URL holding encoder.pkl and decoder.pkl; "
                    f"or {manual}."
                ) from err
        staging = Path(tmp) / "converted"
        staging.mkdir()
        try:
            convert_openai_dall_e(
                sources["encoder"],
                sources["decoder"],
                staging,
                check_images=check_images,
                source_names={p: f"{base.rstrip('/')}/{p}.pkl" for p in sources},
            )
        except DallEConversionError as err:
            raise DallEConversionError(f"{err}\nNothing was cached in {folder}.") from None
        try:
            if folder.is_dir():
                folder.rmdir()  # empty, checked above
            staging.rename(folder)
        except OSError:
            if not _is_converted_folder(folder):  # else another process finished first
                raise
    return folder


# --------------------------------------------------------------------------------------------------
# Reading OpenAI's pickles through an allow-list
# --------------------------------------------------------------------------------------------------


class _OpenAIModule(nn.Module):
    """An unpickled ``dall_e`` module: the pickled attributes and children, and OpenAI's forward.

    Unpickling restores a module's ``__dict__`` through ``nn.Module.__setstate__``, so the pickled
    layer tree (its order, pooling, upsampling, ``post_gain``) runs as pickled; only the three
    ``dall_e`` forwards below are restated. That makes the unpickled module an independent
    reference for the package's own layout.
    """

    pickled_name = ""


class _OpenAIConv2d(_OpenAIModule):
    pickled_name = "dall_e.utils.Conv2d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # OpenAI's code computes in fp16 on CUDA; the check runs on CPU in fp32, as it does there.
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class _OpenAIBlock(_OpenAIModule):
    pickled_name = "dall_e.encoder.EncoderBlock or dall_e.decoder.DecoderBlock"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class _OpenAIEncoder(_OpenAIModule):
    pickled_name = "dall_e.encoder.Encoder"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class _OpenAIDecoder(_OpenAIEncoder):
    pickled_name = "dall_e.decoder.Decoder"


def _allowed_globals() -> dict[tuple[str, str], object]:
    """Every global a dVAE module pickle may name, mapped to what it resolves to.

    Pickles record classes by module path; the torch.nn paths are where torch has defined these
    layers since before the dVAE release. Storages normally never get here (torch.load resolves
    names containing "Storage" itself). Extend this only after reading what the new entry does
    when called with arbitrary arguments.
    """
    allowed: dict[tuple[str, str], object] = {
        ("dall_e.utils", "Conv2d"): _OpenAIConv2d,
        ("dall_e.encoder", "EncoderBlock"): _OpenAIBlock,
        ("dall_e.encoder", "Encoder"): _OpenAIEncoder,
        ("dall_e.decoder", "DecoderBlock"): _OpenAIBlock,
        ("dall_e.decoder", "Decoder"): _OpenAIDecoder,
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


class DallEConversionError(Exception):
    """OpenAI's files could not be converted; the message says which file, why, and what to do."""


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, global_name: str):
        self.global_name = global_name
        super().__init__(f"global {global_name} is not allowed")


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only ALLOWED_GLOBALS and never imports anything."""

    def find_class(self, module: str, name: str) -> object:
        # Protocol-2 pickles (torch.save's default) spell builtins the Python 2 way
        # (__builtin__.set); map them as pickle does, so the allow-list and errors use today's
        # names.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


# torch.load takes a "pickle module": it subclasses `.Unpickler` (its find_class maps storage names
# and then calls ours) and calls `.load` for the legacy format's header records.
_allow_list_pickle = types.ModuleType("allow_list_pickle")
_allow_list_pickle.Unpickler = _AllowListUnpickler
_allow_list_pickle.load = lambda file, **kwargs: _AllowListUnpickler(file, **kwargs).load()
_allow_list_pickle.UnpicklingError = pickle.UnpicklingError


def load_openai_module(data: bytes, label: str) -> nn.Module:
    """Unpickle one of OpenAI's module files (zip or legacy ``torch.save`` format), allow-listed.

    ``torch.load(weights_only=True)`` would be simpler, but it refuses the legacy format's module
    records (measured with torch 2.14), and OpenAI's files predate the zip format. ``data`` is the
    file's bytes, so what is loaded is what was hashed; ``label`` names the file in errors.
    """
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in archive.namelist()):
                # torch.load hands TorchScript archives to torch.jit.load, past the allow-list.
                raise DallEConversionError(
                    f"{label} is a TorchScript archive, not a torch.save pickle of OpenAI's "
                    "module; refusing to load it. Use OpenAI's encoder.pkl / decoder.pkl."
                )
    try:
        with warnings.catch_warnings():
            # Legacy pickles carry each class's source; ours are stand-ins, so it never matches.
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
            return torch.load(
                io.BytesIO(data),
                map_location="cpu",
                weights_only=False,  # torch's safe mode cannot read legacy module pickles...
                pickle_module=_allow_list_pickle,  # ...so the allow-list does the guarding
            )
    except _RefusedGlobal as err:
        raise DallEConversionError(
            f"{label}: refused to unpickle the global {err.global_name}: it is not on the "
            "allow-list of DALL-E dVAE classes and tensor helpers, and a genuine OpenAI dVAE "
            f"pickle does not need it. Treat {label} as untrusted: compare its sha256 with the "
            f"published file. Add {err.global_name} to ALLOWED_GLOBALS only after reading what "
            "it does."
        ) from err
    except Exception as err:  # any other failure: not a readable torch.save pickle
        raise DallEConversionError(
            f"{label} could not be read as a torch.save pickle ({type(err).__name__}: {err}). "
            "Pass OpenAI's original encoder.pkl / decoder.pkl."
        ) from err


# --------------------------------------------------------------------------------------------------
# Converting OpenAI's files to a checked safetensors folder
# --------------------------------------------------------------------------------------------------

CHECK_SIZE = 112  # CIM feeds the tokenizer 112x112 views
IMAGE_ATOL = 1e-5  # decoded images in [0, 1]; measured differences are below 1e-6
STATS_TOL = 1e-4  # rtol and atol on the raw decoder statistics, which are unbounded logits


@dataclass
class DallESource:
    """One converted input file."""

    name: str
    sha256: str
    n_tensors: int
    n_params: int


@dataclass
class DallECheck:
    """The converted tokenizer against the unpickled modules on random images."""

    n_images: int
    tokens_equal: int
    tokens_total: int
    logits_max_diff: float
    stats_max_diff: float
    image_max_diff: float
    ok: bool


@dataclass
class DallEConversion:
    """What ``convert_openai_dall_e`` read, wrote and measured."""

    architecture: dict[str, int]
    encoder: DallESource
    decoder: DallESource
    check: DallECheck
    sums: dict[str, str]  # sha256 of each written file, as in SHA256SUMS


def _converter_name() -> str:
    try:
        return f"cim-models {version('cim-models')} (cim_models.tokenizers.dall_e_openai)"
    except PackageNotFoundError:  # a checkout that is not installed
        return "cim-models (cim_models.tokenizers.dall_e_openai)"


def _infer_architecture(encoder: dict, decoder: dict, labels: dict[str, str]) -> dict[str, int]:
    """Read the four architecture numbers off the tensor shapes."""
    needed = {
        "encoder": ("blocks.input.w", "blocks.output.conv.w"),
        "decoder": ("blocks.input.w",),
    }
    for part, state in (("encoder", encoder), ("decoder", decoder)):
        for key in needed[part]:
            if key not in state:
                raise DallEConversionError(
                    f"{labels[part]} is not a DALL-E dVAE {part}: it has no parameter {key}."
                )
    blocks = {k.split(".")[2] for k in encoder if k.startswith("blocks.group_1.block_")}
    return dict(
        n_hid=encoder["blocks.input.w"].shape[0],
        n_blk_per_group=len(blocks),
        vocab_size=encoder["blocks.output.conv.w"].shape[0],
        n_init=decoder["blocks.input.w"].shape[0],
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@torch.no_grad()
def _check_against(folder: Path, openai: dict[str, nn.Module], n_images: int) -> DallECheck:
    """Compare ``DallETokenizer(weights=folder)`` with the unpickled modules on random images."""
    tokenizer = DallETokenizer(weights=folder).float()  # architecture from config.json
    images = torch.rand(
        n_images, 3, CHECK_SIZE, CHECK_SIZE, generator=torch.Generator().manual_seed(0)
    )
    ref_logits = openai["encoder"](map_pixels(images))  # (N, vocab, 14, 14)
    ref_ids = ref_logits.argmax(1)  # (N, 14, 14)
    one_hot = F.one_hot(ref_ids, tokenizer.vocab_size).permute(0, 3, 1, 2).float()
    ref_stats = openai["decoder"](one_hot)  # (N, 6, 112, 112)
    ref_images = unmap_pixels(torch.sigmoid(ref_stats[:, :3]))
    logits = tokenizer.encode_logits(images)
    # Decode the reference ids, so a token mismatch does not also show up in the decoder.
    stats = tokenizer.decoder.forward_ids(ref_ids)
    decoded = tokenizer.decode(ref_ids)
    tokens_equal = int((logits.argmax(1) == ref_ids).sum())
    return DallECheck(
        n_images=n_images,
        tokens_equal=tokens_equal,
        tokens_total=ref_ids.numel(),
        logits_max_diff=float((logits - ref_logits).abs().max()),
        stats_max_diff=float((stats - ref_stats).abs().max()),
        image_max_diff=float((decoded - ref_images).abs().max()),
        ok=tokens_equal == ref_ids.numel()
        and torch.allclose(stats, ref_stats, rtol=STATS_TOL, atol=STATS_TOL)
        and torch.allclose(decoded, ref_images, rtol=0, atol=IMAGE_ATOL),
    )


def convert_openai_dall_e(
    encoder_pkl: str | os.PathLike,
    decoder_pkl: str | os.PathLike,
    folder: str | os.PathLike,
    check_images: int = 4,
    source_names: dict[str, str] | None = None,
) -> DallEConversion:
    """Convert OpenAI's ``encoder.pkl`` / ``decoder.pkl`` into the existing, empty ``folder``.

    Writes ``encoder.safetensors`` and ``decoder.safetensors`` (fp32, OpenAI's parameter names,
    the source's sha256 in the metadata), ``config.json`` (the architecture, read off the shapes)
    and ``SHA256SUMS``, then checks that ``DallETokenizer(weights=folder)`` gives the same token
    ids and decoded images as the unpickled modules on ``check_images`` random images. Raises
    ``DallEConversionError`` on any failure; callers write to a staging folder and rename it.
    ``source_names`` (``{"encoder": ..., "decoder": ...}``) names the sources in metadata and
    errors, e.g. their URLs; by default their file names.
    """
    if check_images < 1:
        raise DallEConversionError(f"check_images must be at least 1, got {check_images}.")
    folder = Path(folder)
    paths = {"encoder": Path(encoder_pkl), "decoder": Path(decoder_pkl)}
    names = {part: path.name for part, path in paths.items()} | (source_names or {})
    labels = {part: f"the {part} file {names[part]}" for part in paths}
    expected = {"encoder": _OpenAIEncoder, "decoder": _OpenAIDecoder}
    # Built on the CPU even inside from_pretrained's meta-device context: the check runs them.
    with torch.device("cpu"):
        openai, states, sources = {}, {}, {}
        for part, path in paths.items():
            if not path.is_file():
                raise DallEConversionError(
                    f"{labels[part]} does not exist. Download OpenAI's {part}.pkl "
                    f"({OPENAI_URL}{part}.pkl) once, record its sha256, and pass its path."
                )
            data = path.read_bytes()
            module = load_openai_module(data, labels[part])
            if type(module) is not expected[part]:
                found = getattr(module, "pickled_name", "") or type(module).__name__
                raise DallEConversionError(
                    f"{labels[part]} holds a {found}, expected {expected[part].pickled_name}. "
                    "Did you swap the encoder and decoder files?"
                )
            openai[part] = module.float().eval()
            states[part] = {
                k: v.detach().contiguous() for k, v in openai[part].state_dict().items()
            }
            n_params = sum(t.numel() for t in states[part].values())
            digest = hashlib.sha256(data).hexdigest()
            sources[part] = DallESource(names[part], digest, len(states[part]), n_params)
            del data
        arch = _infer_architecture(states["encoder"], states["decoder"], labels)
        with torch.device("meta"):  # the package's layout: its names and shapes, nothing computed
            layout = DallETokenizer(random_init=True, **arch)
        for part in paths:
            try:
                # assign: nothing to copy into meta tensors; the names and shapes are checked
                getattr(layout, part).load_state_dict(states[part], strict=True, assign=True)
            except RuntimeError as err:
                problems = "\n".join(str(err).splitlines()[:7])  # the first few are enough
                raise DallEConversionError(
                    f"{labels[part]} does not match the dVAE {part} with {arch}, read off the "
                    f"shapes: {problems}\nCheck that both files come from the same OpenAI release."
                ) from None

        converter = _converter_name()
        config = {"tokenizer": "dall-e", **arch, "downsample": DallETokenizer.downsample}
        for part, file in (("encoder", ENCODER_FILE), ("decoder", DECODER_FILE)):
            src = sources[part]
            provenance = {"source": src.name, "source_sha256": src.sha256}
            metadata = {"format": "pt", "tokenizer": "dall-e", "part": part, **provenance}
            save_file(states[part], str(folder / file), {**metadata, "converter": converter})
            config[part] = {"file": file, "params": src.n_params, **provenance}
        config["converter"] = converter
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        sums = {name: _sha256(folder / name) for name in (CONFIG_FILE, DECODER_FILE, ENCODER_FILE)}
        (folder / SUMS_FILE).write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))
        umask = os.umask(0)
        os.umask(umask)
        for name in CONVERTED_FILES:  # safetensors writes 0600; these files are meant to be shared
            (folder / name).chmod(0o666 & ~umask)

        try:
            check = _check_against(folder, openai, check_images)
        except Exception as err:  # the pickled modules do not run: not OpenAI's layer tree
            raise DallEConversionError(
                f"The modules in {labels['encoder']} and {labels['decoder']} do not run as a "
                f"DALL-E dVAE ({type(err).__name__}: {err}). Pass OpenAI's original files."
            ) from err
    conversion = DallEConversion(arch, sources["encoder"], sources["decoder"], check, sums)
    if not check.ok:
        raise DallEConversionError(
            "The converted tokenizer does not reproduce the pickled modules: "
            f"{format_conversion(conversion)}\nThis is a bug in the conversion or in "
            "cim_models/tokenizers/dall_e.py; please report it with this output."
        )
    return conversion


def format_conversion(conversion: DallEConversion) -> str:
    """A human-readable report of a conversion."""
    lines = []
    for part in ("encoder", "decoder"):
        src = getattr(conversion, part)
        lines.append(
            f"{part}: {src.name} sha256 {src.sha256}\n"
            f"  {src.n_tensors} tensors, {src.n_params:,} params"
        )
    c = conversion.check
    lines += [
        "architecture: " + ", ".join(f"{k}={v}" for k, v in conversion.architecture.items()),
        f"check on {c.n_images} random {CHECK_SIZE}x{CHECK_SIZE} images:",
        f"  token ids identical: {c.tokens_equal}/{c.tokens_total}",
        f"  encoder logits max |diff|: {c.logits_max_diff:.3g}",
        f"  decoder stats max |diff|: {c.stats_max_diff:.3g} (tolerance {STATS_TOL:g})",
        f"  decoded image max |diff|: {c.image_max_diff:.3g} (tolerance {IMAGE_ATOL:g})",
    ]
    return "\n".join(lines)


__all__ = [
    "DallEConversion",
    "DallEConversionError",
    "convert_openai_dall_e",
    "format_conversion",
    "load_openai_module",
    "openai_cache_folder",
    "openai_weights_folder",
]
