"""cim-convert-dall-e: OpenAI-style module pickles in, checked safetensors out, payloads refused.

The tests write a fake ``dall_e`` package with OpenAI's module paths, class names and attribute
names (without ``attrs``), pickle whole modules with ``torch.save`` in the legacy and the zip
format, and then take the package away again: the converter must not need it. Where OpenAI's
real ``dall_e`` package is installed, one more test compares the converted tokenizer with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import runpy
import shlex
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cim_models.hub import convert_dall_e
from cim_models.tokenizers import create_tokenizer
from cim_models.tokenizers.dall_e import DallEDecoder, DallEEncoder, DallETokenizer, map_pixels
from cim_models.tokenizers.dall_e_openai import DallEConversionError, load_openai_module

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "conversion" / "convert_dall_e.py"
ARCH = {"n_hid": 16, "n_blk_per_group": 1, "vocab_size": 512, "n_init": 32}
CONVERTED = ["SHA256SUMS", "config.json", "decoder.safetensors", "encoder.safetensors"]


# OpenAI's dall_e 0.1 code, minus attrs and the input checks: same module paths, class names,
# attribute names and layer order, so torch.save writes the same globals and state-dict keys.
FAKE_DALL_E = {
    "__init__.py": "",
    "utils.py": """
        import math
        import torch
        import torch.nn as nn
        import torch.nn.functional as F

        class Conv2d(nn.Module):
            def __init__(self, n_in, n_out, kw, use_float16=True, device=torch.device("cpu"),
                         requires_grad=False):
                super().__init__()
                self.n_in, self.n_out, self.kw = n_in, n_out, kw
                self.use_float16, self.device = use_float16, device
                self.requires_grad = requires_grad
                w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32)
                w.normal_(std=1 / math.sqrt(n_in * kw**2))
                b = torch.zeros((n_out,), dtype=torch.float32)
                self.w, self.b = nn.Parameter(w), nn.Parameter(b)

            def forward(self, x):
                return F.conv2d(x.float(), self.w, self.b, padding=(self.kw - 1) // 2)
    """,
    "encoder.py": """
        from collections import OrderedDict
        from functools import partial
        import torch
        import torch.nn as nn
        from dall_e.utils import Conv2d

        class EncoderBlock(nn.Module):
            def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
                super().__init__()
                self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
                self.device, self.requires_grad = device, requires_grad
                self.n_hid = n_out // 4
                self.post_gain = 1 / (n_layers**2)
                make_conv = partial(Conv2d, device=device, requires_grad=requires_grad)
                self.id_path = make_conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
                self.res_path = nn.Sequential(OrderedDict([
                    ("relu_1", nn.ReLU()), ("conv_1", make_conv(n_in, self.n_hid, 3)),
                    ("relu_2", nn.ReLU()), ("conv_2", make_conv(self.n_hid, self.n_hid, 3)),
                    ("relu_3", nn.ReLU()), ("conv_3", make_conv(self.n_hid, self.n_hid, 3)),
                    ("relu_4", nn.ReLU()), ("conv_4", make_conv(self.n_hid, n_out, 1)),
                ]))

            def forward(self, x):
                return self.id_path(x) + self.post_gain * self.res_path(x)

        class Encoder(nn.Module):
            group_count = 4

            def __init__(self, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192,
                         device=torch.device("cpu"), requires_grad=False, use_mixed_precision=True):
                super().__init__()
                self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
                self.input_channels, self.vocab_size = input_channels, vocab_size
                self.device, self.requires_grad = device, requires_grad
                self.use_mixed_precision = use_mixed_precision
                blk_range = range(n_blk_per_group)
                n_layers = self.group_count * n_blk_per_group
                make_conv = partial(Conv2d, device=device, requires_grad=requires_grad)
                make_blk = partial(EncoderBlock, n_layers=n_layers, device=device,
                                   requires_grad=requires_grad)

                def group(n_in, n_out, pool):
                    layers = [(f"block_{i + 1}", make_blk(n_in if i == 0 else n_out, n_out))
                              for i in blk_range]
                    if pool:
                        layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
                    return nn.Sequential(OrderedDict(layers))

                self.blocks = nn.Sequential(OrderedDict([
                    ("input", make_conv(input_channels, 1 * n_hid, 7)),
                    ("group_1", group(1 * n_hid, 1 * n_hid, True)),
                    ("group_2", group(1 * n_hid, 2 * n_hid, True)),
                    ("group_3", group(2 * n_hid, 4 * n_hid, True)),
                    ("group_4", group(4 * n_hid, 8 * n_hid, False)),
                    ("output", nn.Sequential(OrderedDict([
                        ("relu", nn.ReLU()),
                        ("conv", make_conv(8 * n_hid, vocab_size, 1, use_float16=False)),
                    ]))),
                ]))

            def forward(self, x):
                return self.blocks(x)
    """,
    "decoder.py": """
        from collections import OrderedDict
        from functools import partial
        import torch
        import torch.nn as nn
        from dall_e.utils import Conv2d

        class DecoderBlock(nn.Module):
            def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
                super().__init__()
                self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
                self.device, self.requires_grad = device, requires_grad
                self.n_hid = n_out // 4
                self.post_gain = 1 / (n_layers**2)
                make_conv = partial(Conv2d, device=device, requires_grad=requires_grad)
                self.id_path = make_conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
                self.res_path = nn.Sequential(OrderedDict([
                    ("relu_1", nn.ReLU()), ("conv_1", make_conv(n_in, self.n_hid, 1)),
                    ("relu_2", nn.ReLU()), ("conv_2", make_conv(self.n_hid, self.n_hid, 3)),
                    ("relu_3", nn.ReLU()), ("conv_3", make_conv(self.n_hid, self.n_hid, 3)),
                    ("relu_4", nn.ReLU()), ("conv_4", make_conv(self.n_hid, n_out, 3)),
                ]))

            def forward(self, x):
                return self.id_path(x) + self.post_gain * self.res_path(x)

        class Decoder(nn.Module):
            group_count = 4

            def __init__(self, n_init=128, n_hid=256, n_blk_per_group=2, output_channels=3,
                         vocab_size=8192, device=torch.device("cpu"), requires_grad=False,
                         use_mixed_precision=True):
                super().__init__()
                self.n_init, self.n_hid, self.n_blk_per_group = n_init, n_hid, n_blk_per_group
                self.output_channels, self.vocab_size = output_channels, vocab_size
                self.device, self.requires_grad = device, requires_grad
                self.use_mixed_precision = use_mixed_precision
                blk_range = range(n_blk_per_group)
                n_layers = self.group_count * n_blk_per_group
                make_conv = partial(Conv2d, device=device, requires_grad=requires_grad)
                make_blk = partial(DecoderBlock, n_layers=n_layers, device=device,
                                   requires_grad=requires_grad)

                def group(n_in, n_out, upsample):
                    layers = [(f"block_{i + 1}", make_blk(n_in if i == 0 else n_out, n_out))
                              for i in blk_range]
                    if upsample:
                        layers.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
                    return nn.Sequential(OrderedDict(layers))

                self.blocks = nn.Sequential(OrderedDict([
                    ("input", make_conv(vocab_size, n_init, 1, use_float16=False)),
                    ("group_1", group(n_init, 8 * n_hid, True)),
                    ("group_2", group(8 * n_hid, 4 * n_hid, True)),
                    ("group_3", group(4 * n_hid, 2 * n_hid, True)),
                    ("group_4", group(2 * n_hid, 1 * n_hid, False)),
                    ("output", nn.Sequential(OrderedDict([
                        ("relu", nn.ReLU()),
                        ("conv", make_conv(1 * n_hid, 2 * output_channels, 1)),
                    ]))),
                ]))

            def forward(self, x):
                return self.blocks(x)
    """,
}


class Payload:
    """What a trojaned pickle carries: unpickling it calls ``function(*args)``."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@dataclass
class Pickles:
    folder: Path
    images: torch.Tensor  # (2, 3, 64, 64) in [0, 1]
    ref_ids: torch.Tensor  # the fake encoder's argmax on them
    ref_decoded: torch.Tensor  # the fake decoder's reconstruction of ref_ids
    pwned: Path  # the file every payload tries to create

    def path(self, name: str) -> Path:
        return self.folder / name


@contextmanager
def importable_dall_e(site: Path | None):
    """Make ``site``'s ``dall_e`` importable (None: none at all), restoring sys.modules after."""
    saved = {n: m for n, m in sys.modules.items() if n == "dall_e" or n.startswith("dall_e.")}
    for name in saved:
        del sys.modules[name]
    if site is None:
        sys.modules["dall_e"] = None  # makes `import dall_e` raise ImportError
    else:
        sys.path.insert(0, str(site))
    try:
        yield
    finally:
        if site is not None:
            sys.path.remove(str(site))
        for name in [n for n in sys.modules if n == "dall_e" or n.startswith("dall_e.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def make_openai_pickles(root: Path) -> Pickles:
    """Tiny OpenAI-style pickles (random weights and biases), genuine and trojaned, in ``root``."""
    site = root / "site"
    (site / "dall_e").mkdir(parents=True)
    for name, source in FAKE_DALL_E.items():
        (site / "dall_e" / name).write_text(textwrap.dedent(source))
    pwned = root / "pwned"
    shell = f"echo pwned > {shlex.quote(str(pwned))}"
    with importable_dall_e(site):
        from dall_e.decoder import Decoder
        from dall_e.encoder import Encoder

        torch.manual_seed(0)
        encoder = Encoder(n_hid=16, n_blk_per_group=1, vocab_size=512)
        decoder = Decoder(n_init=32, n_hid=16, n_blk_per_group=1, vocab_size=512)
        for module in (encoder, decoder):  # upstream's zero biases would hide a dropped bias
            for name, param in module.named_parameters():
                if name.endswith(".b"):
                    param.data.normal_(std=0.1)
        images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref_ids = encoder(map_pixels(images)).argmax(1)  # (2, 8, 8)
            stats = decoder(F.one_hot(ref_ids, 512).permute(0, 3, 1, 2).float())
            ref_decoded = torch.clamp((torch.sigmoid(stats[:, :3]) - 0.1) / 0.8, 0, 1)

        for fmt, zip_format in (("legacy", False), ("zip", True)):
            for name, module in (("encoder", encoder), ("decoder", decoder)):
                torch.save(
                    module, root / f"{name}-{fmt}.pkl", _use_new_zipfile_serialization=zip_format
                )
            # A trojaned encoder: a real module with a payload among its attributes.
            for kind, payload in (
                ("system", Payload(os.system, shell)),
                ("eval", Payload(eval, f"__import__('os').system({shell!r})")),
            ):
                encoder.__dict__["payload"] = payload
                torch.save(
                    encoder,
                    root / f"evil-{kind}-{fmt}.pkl",
                    _use_new_zipfile_serialization=zip_format,
                )
            del encoder.__dict__["payload"]
        # A decoder of another architecture: the pair does not belong together.
        other = Decoder(n_init=32, n_hid=32, n_blk_per_group=1, vocab_size=512)
        torch.save(other, root / "decoder-n_hid32-zip.pkl")
        # Not even a torch.save file: torch.load unpickles its first record with our pickle module.
        with open(root / "evil-system-raw.pkl", "wb") as f:
            pickle.dump(Payload(os.system, shell), f)
    return Pickles(root, images, ref_ids, ref_decoded, pwned)


@pytest.fixture(scope="module")
def pickles(tmp_path_factory) -> Pickles:
    return make_openai_pickles(tmp_path_factory.mktemp("openai"))


def run(argv: list) -> int:
    return convert_dall_e.main([str(a) for a in argv])


def pkl_args(
    pickles: Pickles, fmt: str = "zip", encoder: str = "encoder", decoder: str = "decoder"
):
    enc = pickles.path(encoder if encoder.endswith(".pkl") else f"{encoder}-{fmt}.pkl")
    dec = pickles.path(decoder if decoder.endswith(".pkl") else f"{decoder}-{fmt}.pkl")
    return ["--encoder", enc, "--decoder", dec]


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_converts_both_pickle_formats_without_the_dall_e_package(pickles, fmt, tmp_path, capsys):
    out = tmp_path / "dall-e"
    with importable_dall_e(None):  # whether or not OpenAI's package is installed
        assert run([*pkl_args(pickles, fmt), "--out", out, "--check-images", "1"]) == 0

    assert sorted(p.name for p in out.iterdir()) == CONVERTED
    assert siblings(out) == ["dall-e"]  # no staging folder left behind
    report = capsys.readouterr().out
    assert "token ids identical: 196/196" in report
    n_params = sum(p.numel() for p in DallEEncoder(16, 1, 512).parameters())
    assert f"{n_params:,} params" in report


@pytest.fixture(scope="module")
def converted(pickles, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "dall-e"
    assert run([*pkl_args(pickles, "legacy"), "--out", out, "--check-images", "1"]) == 0
    return out


def test_tokenizer_on_converted_weights_matches_the_openai_modules(pickles, converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["tokenizer"] == "dall-e" and config["downsample"] == 8
    assert {k: config[k] for k in ARCH} == ARCH

    tokenizer = create_tokenizer("dall-e", weights=str(converted))  # config.json gives ARCH
    assert tokenizer.vocab_size == 512 and tokenizer.architecture == ARCH
    assert torch.equal(tokenizer.encode(pickles.images), pickles.ref_ids)
    torch.testing.assert_close(
        tokenizer.decode(pickles.ref_ids), pickles.ref_decoded, rtol=0, atol=1e-5
    )
    # And the files themselves hold exactly the tokenizer's keys, in fp32.
    for file, module in (
        ("encoder", DallEEncoder(16, 1, 512)),
        ("decoder", DallEDecoder(32, 16, 1, 512)),
    ):
        state = load_file(converted / f"{file}.safetensors")
        module.load_state_dict(state, strict=True)
        assert all(t.dtype == torch.float32 and t.is_contiguous() for t in state.values())


def test_architecture_comes_from_config_json_and_contradictions_are_refused(converted, tmp_path):
    assert DallETokenizer(weights=converted, n_hid=16).architecture == ARCH  # agreeing is fine
    with pytest.raises(ValueError, match=r"n_hid=32.*n_hid=16"):
        DallETokenizer(weights=converted, n_hid=32)
    # Without config.json the keyword arguments (default: OpenAI's) give it, and a mismatch
    # names the file and says what to pass instead of a bare size-mismatch list.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("encoder.safetensors", "decoder.safetensors"):
        (bare / name).write_bytes((converted / name).read_bytes())
    assert DallETokenizer(weights=bare, **ARCH).vocab_size == 512
    with pytest.raises(ValueError, match="decoder.safetensors does not fit.*n_init"):
        DallETokenizer(weights=bare, **{**ARCH, "n_init": 64})


def test_sha256sums_and_metadata_name_every_file_and_source(pickles, converted):
    lines = (converted / "SHA256SUMS").read_text().splitlines()
    listed = dict(reversed(line.split("  ", 1)) for line in lines)
    assert sorted(listed) == ["config.json", "decoder.safetensors", "encoder.safetensors"]
    for name, digest in listed.items():
        assert hashlib.sha256((converted / name).read_bytes()).hexdigest() == digest

    for part in ("encoder", "decoder"):
        source = hashlib.sha256(pickles.path(f"{part}-legacy.pkl").read_bytes()).hexdigest()
        with safe_open(converted / f"{part}.safetensors", "pt") as f:
            metadata = f.metadata()
        assert metadata["source_sha256"] == source and metadata["source"] == f"{part}-legacy.pkl"
        assert "cim-models" in metadata["converter"]
        assert json.loads((converted / "config.json").read_text())[part]["source_sha256"] == source


@pytest.mark.parametrize(
    "evil, global_name",
    [
        ("evil-system-legacy.pkl", f"{os.system.__module__}.system"),
        ("evil-system-zip.pkl", f"{os.system.__module__}.system"),
        ("evil-system-raw.pkl", f"{os.system.__module__}.system"),
        ("evil-eval-legacy.pkl", "builtins.eval"),
        ("evil-eval-zip.pkl", "builtins.eval"),
    ],
)
def test_payload_pickle_is_refused_naming_the_global(pickles, evil, global_name, tmp_path, capsys):
    out = tmp_path / "dall-e"
    assert run([*pkl_args(pickles, encoder=evil), "--out", out]) != 0
    error = capsys.readouterr().err
    assert global_name in error and "allow-list" in error and evil in error
    assert not pickles.pwned.exists()
    assert not out.exists() and siblings(out) == []


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated
def test_torchscript_archive_is_refused_before_torch_load(tmp_path):
    # torch.load would hand it to torch.jit.load, which runs no allow-list.
    path = tmp_path / "encoder.pkl"
    torch.jit.script(torch.nn.ReLU()).save(str(path))
    with pytest.raises(DallEConversionError, match="TorchScript"):
        load_openai_module(path.read_bytes(), "encoder.pkl")


def test_failed_check_exits_nonzero_and_writes_nothing(pickles, tmp_path, capsys, monkeypatch):
    # A tokenizer that disagrees with the pickled modules stands in for any conversion bug.
    original = DallEDecoder.forward_ids
    monkeypatch.setattr(DallEDecoder, "forward_ids", lambda self, ids: original(self, ids) + 1e-3)
    out = tmp_path / "dall-e"
    assert run([*pkl_args(pickles), "--out", out, "--check-images", "1"]) != 0
    assert "does not reproduce the pickled modules" in capsys.readouterr().err
    assert not out.exists() and siblings(out) == []


def test_encoder_and_decoder_of_different_architectures_are_refused(pickles, tmp_path, capsys):
    out = tmp_path / "dall-e"
    assert run([*pkl_args(pickles, decoder="decoder-n_hid32-zip.pkl"), "--out", out]) != 0
    error = capsys.readouterr().err
    assert "decoder-n_hid32-zip.pkl does not match the dVAE decoder" in error
    assert "'n_hid': 16" in error and "blocks.group_1.block_1" in error
    assert not out.exists() and siblings(out) == []


def test_non_empty_out_is_kept_unless_overwrite(pickles, tmp_path, capsys):
    out = tmp_path / "dall-e"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = [*pkl_args(pickles), "--out", out, "--check-images", "1"]
    assert run(argv) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"

    assert run([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == CONVERTED
    assert siblings(out) == ["dall-e"]


def test_swapped_encoder_and_decoder_are_refused(pickles, tmp_path, capsys):
    out = tmp_path / "dall-e"
    assert run([*pkl_args(pickles, encoder="decoder", decoder="encoder"), "--out", out]) != 0
    assert "swap" in capsys.readouterr().err
    assert not out.exists()


def test_script_in_conversion_folder_runs_the_package_command(
    pickles, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "dall-e"
    argv = [*pkl_args(pickles, "legacy"), "--out", out, "--check-images", "1"]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *map(str, argv)])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the checkout first
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_info.value.code == 0
    assert "token ids identical: 196/196" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == CONVERTED


class FakeHfApi:
    """Records what would be sent to the Hub."""

    calls: ClassVar[list] = []
    fail_upload = False

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, commit_message=None):
        if self.fail_upload:
            raise OSError("offline mode is enabled")
        self.calls.append(("upload_folder", repo_id, Path(folder_path), sorted(allow_patterns)))
        return type("CommitInfo", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()


def test_push_to_hub_uploads_exactly_the_converted_files(converted, monkeypatch, capsys):
    monkeypatch.setattr(convert_dall_e, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    (converted / "notes.txt").write_text("not for the Hub")
    try:
        assert run(["--out", converted, "--push-to-hub", "me/dall-e", "--private"]) == 0
    finally:
        (converted / "notes.txt").unlink()
    assert FakeHfApi.calls[1:] == [
        ("create_repo", "me/dall-e", True, True),
        ("upload_folder", "me/dall-e", converted, CONVERTED),
    ]
    assert "https://hub/me/dall-e/commit/1" in capsys.readouterr().out

    # A failed upload keeps the folder and says how to retry the upload alone.
    monkeypatch.setattr(FakeHfApi, "fail_upload", True)
    assert run(["--out", converted, "--push-to-hub", "me/dall-e"]) == 1
    error = capsys.readouterr().err
    assert f"--out {converted} --push-to-hub me/dall-e" in error and "hf auth login" in error
    assert sorted(p.name for p in converted.iterdir()) == CONVERTED


def test_push_to_hub_refuses_a_folder_that_is_not_converted(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(convert_dall_e, "HfApi", FakeHfApi)
    save_file({"w": torch.zeros(1)}, tmp_path / "encoder.safetensors")
    assert run(["--out", tmp_path, "--push-to-hub", "me/dall-e"]) == 1
    error = capsys.readouterr().err
    assert (
        "lacks config.json, decoder.safetensors, SHA256SUMS" in error and "Convert first" in error
    )
    with pytest.raises(SystemExit):
        run(["--out", tmp_path, "--encoder", "encoder.pkl"])  # --decoder is missing


def test_tokenizer_refuses_a_pickle_path(pickles):
    with pytest.raises(ValueError, match="convert_dall_e.py"):
        DallETokenizer(weights=pickles.path("encoder-zip.pkl"))


def test_matches_openai_dall_e_package_when_installed(tmp_path):
    dall_e = pytest.importorskip("dall_e")
    # The smallest architecture OpenAI's validators accept (n_hid >= 64, vocab_size >= 512).
    torch.manual_seed(0)
    encoder = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    decoder = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    for module in (encoder, decoder):
        for name, param in module.named_parameters():
            if name.endswith(".b"):
                param.data.normal_(std=0.1)
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        torch.save(module, tmp_path / f"{name}.pkl", _use_new_zipfile_serialization=False)
    convert_dall_e.convert(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", tmp_path / "out", 1)

    tokenizer = DallETokenizer(weights=tmp_path / "out")
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ids = encoder(dall_e.map_pixels(images)).argmax(1)
        stats = decoder(F.one_hot(ids, 512).permute(0, 3, 1, 2).float())
    assert torch.equal(tokenizer.encode(images), ids)
    expected = dall_e.unmap_pixels(torch.sigmoid(stats[:, :3]))
    torch.testing.assert_close(tokenizer.decode(ids), expected, rtol=0, atol=1e-5)
