"""The DALL-E discrete VAE (Ramesh et al., 2021): CIM's frozen tokenizer, and finding its weights.

The modules reproduce OpenAI's architecture and parameter names (``blocks.group_1.block_1.res_path.
conv_1.w`` and so on), so the state dicts of OpenAI's ``encoder.pkl`` / ``decoder.pkl`` load into
them with ``strict=True``. This module loads safetensors only; OpenAI's pickles are read and
converted once by ``dall_e_openai`` (behind ``weights="openai"`` and ``cim-convert-dall-e``).
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path

import huggingface_hub
import torch
import torch.nn.functional as F
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors.torch import load_file
from torch import nn

from .base import ImageTokenizer

LOGIT_LAPLACE_EPS = 0.1
ENCODER_FILE = "encoder.safetensors"
DECODER_FILE = "decoder.safetensors"
CONFIG_FILE = "config.json"
SUMS_FILE = "SHA256SUMS"
CONVERTED_FILES = (CONFIG_FILE, DECODER_FILE, ENCODER_FILE, SUMS_FILE)
ARCHITECTURE_KEYS = ("n_hid", "n_blk_per_group", "vocab_size", "n_init")
OPENAI_ARCHITECTURE = dict(n_hid=256, n_blk_per_group=2, vocab_size=8192, n_init=128)
OPENAI_URL = "https://cdn.openai.com/dall-e/"
URL_ENV = "CIM_DALL_E_URL"  # a folder URL holding encoder.pkl and decoder.pkl, e.g. a mirror
CONVERT_COMMAND = "cim-convert-dall-e --encoder encoder.pkl --decoder decoder.pkl --out DIR"


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps], the range the dVAE was trained on."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


class Conv2d(nn.Module):
    """A same-padded stride-1 convolution with parameters ``w`` and ``b``, as in OpenAI's code."""

    def __init__(self, n_in: int, n_out: int, kernel_size: int):
        super().__init__()
        scale = 1 / math.sqrt(n_in * kernel_size**2)
        self.w = nn.Parameter(torch.randn(n_out, n_in, kernel_size, kernel_size) * scale)
        self.b = nn.Parameter(torch.zeros(n_out))
        self.padding = (kernel_size - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=self.padding)


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, n_hid, n_hid, n_hid, n_out)
        layers = OrderedDict()
        for i, k in enumerate(kernels, start=1):
            layers[f"relu_{i}"] = nn.ReLU()
            layers[f"conv_{i}"] = Conv2d(widths[i - 1], widths[i], k)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(blocks: list[nn.Module], resample: nn.Module | None) -> nn.Sequential:
    layers = OrderedDict((f"block_{i + 1}", block) for i, block in enumerate(blocks))
    if resample is not None:
        layers["pool" if isinstance(resample, nn.MaxPool2d) else "upsample"] = resample
    return nn.Sequential(layers)


class DallEEncoder(nn.Module):
    """Image (B, 3, H, W) in the mapped pixel range -> token logits (B, vocab_size, H/8, W/8)."""

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192):
        super().__init__()
        n_layers = 4 * n_blk_per_group
        widths = (1 * n_hid, 1 * n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid)
        groups = OrderedDict(input=Conv2d(3, n_hid, 7))
        for g in range(4):
            blocks = [
                _Block(
                    widths[g] if i == 0 else widths[g + 1], widths[g + 1], n_layers, (3, 3, 3, 1)
                )
                for i in range(n_blk_per_group)
            ]
            groups[f"group_{g + 1}"] = _group(blocks, nn.MaxPool2d(2) if g < 3 else None)
        head = OrderedDict(relu=nn.ReLU(), conv=Conv2d(8 * n_hid, vocab_size, 1))
        groups["output"] = nn.Sequential(head)
        self.blocks = nn.Sequential(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class DallEDecoder(nn.Module):
    """Token grid -> 6 logit-Laplace statistics per pixel (B, 6, 8h, 8w); the first 3 are means."""

    def __init__(
        self, n_init: int = 128, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192
    ):
        super().__init__()
        n_layers = 4 * n_blk_per_group
        widths = (n_init, 8 * n_hid, 4 * n_hid, 2 * n_hid, 1 * n_hid)
        groups = OrderedDict(input=Conv2d(vocab_size, n_init, 1))
        for g in range(4):
            blocks = [
                _Block(
                    widths[g] if i == 0 else widths[g + 1], widths[g + 1], n_layers, (1, 3, 3, 3)
                )
                for i in range(n_blk_per_group)
            ]
            upsample = nn.Upsample(scale_factor=2, mode="nearest") if g < 3 else None
            groups[f"group_{g + 1}"] = _group(blocks, upsample)
        groups["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv2d(n_hid, 6, 1)))
        self.blocks = nn.Sequential(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: a (soft) one-hot map (B, vocab_size, h, w), as OpenAI's decoder takes it."""
        return self.blocks(x)

    def forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Decode an id grid (B, h, w) without building the (B, vocab_size, h, w) one-hot tensor.

        The input layer is a 1x1 convolution of a one-hot vector, i.e. a row lookup of its weight.
        """
        conv = self.blocks.input
        x = F.embedding(ids, conv.w[:, :, 0, 0].t()) + conv.b  # (B, h, w, n_init)
        x = x.permute(0, 3, 1, 2)  # channels_last in memory, the fast layout for the convolutions
        for name, module in self.blocks.named_children():
            if name != "input":
                x = module(x)
        return x


class DallETokenizer(ImageTokenizer):
    """The frozen DALL-E dVAE: ``encode`` = argmax of the encoder logits, ``decode`` = the mean.

    Args:
        weights: where the weights come from:

            - ``"openai"``: OpenAI's release, downloaded once from ``$CIM_DALL_E_URL`` (default
              https://cdn.openai.com/dall-e/), converted and checked, and cached in
              ``$HF_HOME/cim-models/dall-e`` (see ``openai_weights_folder``); offline
              (``HF_HUB_OFFLINE=1``) only the cache is used;
            - a folder written by ``cim-convert-dall-e`` (``encoder.safetensors``,
              ``decoder.safetensors`` and ``config.json``, which gives the architecture);
            - a Hugging Face Hub repo id holding such a folder.
        random_init: allow running without weights. Off by default: CIM on a random tokenizer
            trains without error and learns nothing useful, so it must be asked for explicitly
            (tests, benchmarks).
        seed: the seed of the random initialisation, so a random tokenizer can be rebuilt.
        n_hid, n_blk_per_group, vocab_size, n_init: the architecture. By default the weights'
            ``config.json`` gives it, else OpenAI's (256, 2, 8192, 128); a value that disagrees
            with ``config.json`` is an error.
    """

    downsample = 8

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        random_init: bool = False,
        seed: int = 0,
        n_hid: int | None = None,
        n_blk_per_group: int | None = None,
        vocab_size: int | None = None,
        n_init: int | None = None,
    ):
        super().__init__()
        self.weights = None if weights is None else os.fspath(weights)
        self.random_init = random_init
        self.seed = seed
        requested = dict(
            n_hid=n_hid, n_blk_per_group=n_blk_per_group, vocab_size=vocab_size, n_init=n_init
        )
        self.architecture = _resolve_architecture(self.weights, requested)
        arch = self.architecture
        self.vocab_size = arch["vocab_size"]
        self.encoder = DallEEncoder(arch["n_hid"], arch["n_blk_per_group"], arch["vocab_size"])
        self.decoder = DallEDecoder(
            arch["n_init"], arch["n_hid"], arch["n_blk_per_group"], arch["vocab_size"]
        )
        self.reload_weights()

    def reload_weights(self) -> None:
        if self.encoder.blocks.input.w.is_meta:
            self.freeze()
            return  # built inside from_pretrained: materialised and reloaded later by _init_weights
        if self.weights is not None:
            encoder_path, decoder_path = resolve_dall_e_weights(self.weights)
            for module, path in ((self.encoder, encoder_path), (self.decoder, decoder_path)):
                try:
                    module.load_state_dict(load_file(path), strict=True)
                except RuntimeError as err:  # a folder without config.json, other architecture
                    problems = "\n".join(str(err).splitlines()[:4])  # the first few are enough
                    raise ValueError(
                        f"{path} does not fit the DALL-E architecture {self.architecture}: "
                        f"{problems}\n"
                        "Pass the n_hid, n_blk_per_group, vocab_size and n_init the weights were "
                        f"made with, or convert them again with `{CONVERT_COMMAND}`, which writes "
                        "the config.json that gives the architecture."
                    ) from None
        elif self.random_init:
            # A seeded re-initialisation, so a random tokenizer is the same after save / load.
            rng = torch.Generator().manual_seed(self.seed)
            for module in self.modules():
                if isinstance(module, Conv2d):
                    _, n_in, k, _ = module.w.shape
                    scale = 1 / math.sqrt(n_in * k * k)
                    module.w.data.copy_(torch.randn(module.w.shape, generator=rng) * scale)
                    module.b.data.copy_(torch.randn(module.b.shape, generator=rng) * 0.01)
        self.freeze()

    def _check_ready(self) -> None:
        if self.weights is None and not self.random_init:
            raise RuntimeError(
                'The DALL-E tokenizer has no weights. Pass weights="openai" to download and '
                "convert OpenAI's release once, or convert encoder.pkl/decoder.pkl yourself with "
                f"`{CONVERT_COMMAND}` (`python conversion/convert_dall_e.py` in a checkout) and "
                "pass weights=DIR (or a Hub repo id holding the converted files). For tests and "
                "benchmarks only, pass random_init=True."
            )

    @staticmethod
    def _precision(device: torch.device):
        # On GPUs the dVAE runs in fp16, as OpenAI's own code does, whatever the caller's autocast:
        # bf16's 8-bit mantissa flips near-tied argmaxes (token agreement with fp32 measured at
        # 96.7% for bf16 and 99.6% for fp16, full-size architecture) and fp16 runs at the same
        # tensor-core rate. Elsewhere it runs in fp32.
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast(device.type, enabled=False)

    @torch.no_grad()
    def encode_logits(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        self._check_ready()
        # channels_last activations are the fast convolution layout on GPUs and CPUs (1.2x
        # encoder, 1.5x decoder measured on CPU; the decoder's embedding input comes out in it).
        # The weights stay contiguous so that state dicts save as safetensors.
        x = map_pixels(images.float()).contiguous(memory_format=torch.channels_last)
        with self._precision(images.device):
            return self.encoder(x).float()  # (B, vocab_size, H/8, W/8)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_logits(images).argmax(1)  # (B, H/8, W/8)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        self.check_ids(ids)
        self._check_ready()
        with self._precision(ids.device):
            stats = self.decoder.forward_ids(ids.long())  # (B, 6, 8h, 8w)
        return unmap_pixels(torch.sigmoid(stats[:, :3].float()))


# --------------------------------------------------------------------------------------------------
# Finding the weights: "openai", a converted folder, or a Hub repo
# --------------------------------------------------------------------------------------------------


def _is_hub_repo_id(weights: str) -> bool:
    return not weights.startswith((".", "/", "~")) and weights.count("/") == 1


def _check_weights_source(weights: str) -> None:
    if weights.endswith((".pkl", ".pt", ".pth", ".bin")):
        raise ValueError(
            f"{weights!r} is a pickle; the tokenizer loads safetensors only. Pass "
            f'weights="openai", or convert the file with `{CONVERT_COMMAND}` '
            "(`python conversion/convert_dall_e.py` in a checkout) and pass weights=DIR."
        )
    path = Path(weights)
    if (
        weights != "openai"
        and not path.is_dir()
        and (path.exists() or not _is_hub_repo_id(weights))
    ):
        raise FileNotFoundError(
            f'DALL-E weights not found: {weights!r} is neither "openai", a folder, nor a Hub repo '
            "id (owner/name)."
        )


def _hub_download(repo_id: str, filename: str) -> str:
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        raise
    except Exception as err:  # offline, missing repo, no network: say what to do instead
        raise OSError(
            f"Could not fetch {filename} of the DALL-E tokenizer from the Hub repo {repo_id!r} "
            f"({type(err).__name__}: {err}). Go online, or pass a local folder made by "
            f"`{CONVERT_COMMAND}` instead."
        ) from err


def _read_architecture(config_path: str | Path) -> dict[str, int]:
    config = json.loads(Path(config_path).read_text())
    missing = [k for k in ARCHITECTURE_KEYS if not isinstance(config.get(k), int)]
    if config.get("tokenizer") != "dall-e" or missing:
        raise ValueError(
            f"{config_path} is not the config.json of a converted DALL-E tokenizer (it needs "
            f'"tokenizer": "dall-e" and integer {", ".join(ARCHITECTURE_KEYS)}). Convert the '
            f"weights with `{CONVERT_COMMAND}`."
        )
    return {k: config[k] for k in ARCHITECTURE_KEYS}


def _weights_architecture(weights: str | None) -> tuple[dict[str, int] | None, str]:
    """The architecture the weights' config.json gives (None if there is none), and its path."""
    if weights is None:
        return None, ""
    _check_weights_source(weights)
    if weights == "openai":
        # Imported on use: converting OpenAI's release builds on this module's tokenizer.
        from .dall_e_openai import openai_weights_folder

        config_path = openai_weights_folder() / CONFIG_FILE
    elif Path(weights).is_dir():
        config_path = Path(weights) / CONFIG_FILE
        if not config_path.is_file():
            return None, ""  # safetensors alone: the keyword arguments give the architecture
    else:
        try:
            config_path = _hub_download(weights, CONFIG_FILE)
        except LocalEntryNotFoundError as err:
            raise OSError(
                f"The Hub repo {weights!r} is not in the cache and the Hub is unreachable or "
                f"HF_HUB_OFFLINE is set ({err}). Go online once, or pass a local folder made by "
                f"`{CONVERT_COMMAND}`."
            ) from err
        except EntryNotFoundError:
            return None, ""
    return _read_architecture(config_path), str(config_path)


def _resolve_architecture(weights: str | None, requested: dict) -> dict[str, int]:
    given = {k: v for k, v in requested.items() if v is not None}
    found, where = _weights_architecture(weights)
    if found is None:
        return {**OPENAI_ARCHITECTURE, **given}
    wrong = {k: v for k, v in given.items() if found[k] != v}
    if wrong:
        asked = ", ".join(f"{k}={v}" for k, v in wrong.items())
        has = ", ".join(f"{k}={found[k]}" for k in wrong)
        raise ValueError(
            f"DallETokenizer({asked}) disagrees with the weights {weights!r}, whose {where} says "
            f"{has}. Drop these arguments (config.json gives the architecture) or pass weights "
            "made for that architecture."
        )
    return found


def resolve_dall_e_weights(weights: str) -> tuple[str, str]:
    """Paths of ``encoder.safetensors`` and ``decoder.safetensors`` for ``weights`` (see
    ``DallETokenizer``), downloading from the Hub or OpenAI where needed."""
    _check_weights_source(weights)
    if weights == "openai":
        from .dall_e_openai import openai_weights_folder

        folder = openai_weights_folder()
        return str(folder / ENCODER_FILE), str(folder / DECODER_FILE)
    folder = Path(weights)
    if folder.is_dir():
        paths = (folder / ENCODER_FILE, folder / DECODER_FILE)
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} lacks {', '.join(missing)}; it should be a folder written by "
                f"`{CONVERT_COMMAND}`."
            )
        return str(paths[0]), str(paths[1])
    try:
        return _hub_download(weights, ENCODER_FILE), _hub_download(weights, DECODER_FILE)
    except EntryNotFoundError as err:  # includes LocalEntryNotFoundError: offline, not cached
        raise OSError(
            f"Could not get the DALL-E tokenizer files from the Hub repo {weights!r} ({err}). Go "
            f"online, or pass a local folder made by `{CONVERT_COMMAND}` instead."
        ) from err
