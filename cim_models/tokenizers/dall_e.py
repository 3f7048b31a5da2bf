"""The DALL-E discrete VAE (Ramesh et al., 2021) as CIM's frozen tokenizer.

The modules reproduce OpenAI's architecture and parameter names (``blocks.group_1.block_1.res_path.conv_1.w``
and so on), so the state dicts of the official ``encoder.pkl`` / ``decoder.pkl``, once converted to
safetensors by ``conversion/convert_dall_e.py``, load with ``strict=True``. Nothing here unpickles.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .base import ImageTokenizer

LOGIT_LAPLACE_EPS = 0.1
ENCODER_FILE = "encoder.safetensors"
DECODER_FILE = "decoder.safetensors"


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps], the range the dVAE was trained on."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


class Conv2d(nn.Module):
    """A same-padded stride-1 convolution whose parameters are named ``w`` and ``b`` as in OpenAI's code."""

    def __init__(self, n_in: int, n_out: int, kernel_size: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kernel_size, kernel_size) / math.sqrt(n_in * kernel_size**2))
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
                _Block(widths[g] if i == 0 else widths[g + 1], widths[g + 1], n_layers, (3, 3, 3, 1))
                for i in range(n_blk_per_group)
            ]
            groups[f"group_{g + 1}"] = _group(blocks, nn.MaxPool2d(2) if g < 3 else None)
        groups["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv2d(8 * n_hid, vocab_size, 1)))
        self.blocks = nn.Sequential(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class DallEDecoder(nn.Module):
    """Token grid -> 6 logit-Laplace statistics per pixel (B, 6, 8h, 8w); the first 3 are the means."""

    def __init__(self, n_init: int = 128, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192):
        super().__init__()
        n_layers = 4 * n_blk_per_group
        widths = (n_init, 8 * n_hid, 4 * n_hid, 2 * n_hid, 1 * n_hid)
        groups = OrderedDict(input=Conv2d(vocab_size, n_init, 1))
        for g in range(4):
            blocks = [
                _Block(widths[g] if i == 0 else widths[g + 1], widths[g + 1], n_layers, (1, 3, 3, 3))
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
    """The frozen DALL-E dVAE: ``encode`` = argmax of the encoder logits, ``decode`` = the decoder's mean.

    Args:
        weights: a folder holding ``encoder.safetensors`` and ``decoder.safetensors`` (what
            ``conversion/convert_dall_e.py`` writes) or a Hugging Face Hub repo id with those files.
        random_init: allow running without weights. Off by default: CIM on a random tokenizer trains
            without error and learns nothing useful, so it must be asked for explicitly (tests, benchmarks).
        seed: the seed of the random initialisation, so a random tokenizer can be rebuilt identically.
        n_hid, n_blk_per_group, vocab_size, n_init: the architecture; the defaults are OpenAI's.
    """

    downsample = 8

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        random_init: bool = False,
        seed: int = 0,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        vocab_size: int = 8192,
        n_init: int = 128,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.weights = None if weights is None else str(weights)
        self.random_init = random_init
        self.seed = seed
        self.encoder = DallEEncoder(n_hid, n_blk_per_group, vocab_size)
        self.decoder = DallEDecoder(n_init, n_hid, n_blk_per_group, vocab_size)
        self.reload_weights()

    def reload_weights(self) -> None:
        if self.encoder.blocks.input.w.is_meta:
            self.freeze()
            return  # built inside from_pretrained: materialised and reloaded later by _init_weights
        if self.weights is not None:
            encoder_path, decoder_path = resolve_dall_e_weights(self.weights)
            self.encoder.load_state_dict(load_file(encoder_path), strict=True)
            self.decoder.load_state_dict(load_file(decoder_path), strict=True)
        elif self.random_init:
            # A seeded re-initialisation, so a random tokenizer is the same after save / from_pretrained.
            rng = torch.Generator().manual_seed(self.seed)
            for module in self.modules():
                if isinstance(module, Conv2d):
                    n_out, n_in, k, _ = module.w.shape
                    module.w.data.copy_(torch.randn(module.w.shape, generator=rng) / math.sqrt(n_in * k * k))
                    module.b.data.copy_(torch.randn(module.b.shape, generator=rng) * 0.01)
        self.freeze()

    def _check_ready(self) -> None:
        if self.weights is None and not self.random_init:
            raise RuntimeError(
                "The DALL-E tokenizer has no weights. Convert OpenAI's encoder.pkl/decoder.pkl once with "
                "`python conversion/convert_dall_e.py --encoder encoder.pkl --decoder decoder.pkl --out DIR` "
                "and pass weights=DIR (or a Hub repo id holding the converted files). For tests and "
                "benchmarks only, pass random_init=True."
            )

    @staticmethod
    def _precision(device: torch.device):
        # On GPUs the dVAE runs in fp16, as OpenAI's own code does, whatever the caller's autocast:
        # bf16's 8-bit mantissa flips near-tied argmaxes (token agreement with fp32 measured at 96.7% for
        # bf16 and 99.6% for fp16, full-size architecture) and fp16 runs at the same tensor-core rate.
        # Elsewhere it runs in fp32.
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast(device.type, enabled=False)

    @torch.no_grad()
    def encode_logits(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        self._check_ready()
        # channels_last activations are the fast convolution layout on GPUs and CPUs (1.2x encoder, 1.5x
        # decoder measured on CPU; the decoder's embedding input comes out in it). The weights stay
        # contiguous so that state dicts save as safetensors.
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


def resolve_dall_e_weights(weights: str) -> tuple[str, str]:
    """Find ``encoder.safetensors`` and ``decoder.safetensors`` in a local folder or a Hub repo."""
    if str(weights).endswith((".pkl", ".pt", ".pth", ".bin")):
        raise ValueError(
            f"{weights!r} is a pickle; the tokenizer loads safetensors only. Convert it with "
            "`python conversion/convert_dall_e.py --encoder encoder.pkl --decoder decoder.pkl --out DIR`."
        )
    folder = Path(weights)
    if folder.is_dir():
        paths = (folder / ENCODER_FILE, folder / DECODER_FILE)
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} lacks {', '.join(missing)}; it should be the output folder of "
                "conversion/convert_dall_e.py."
            )
        return str(paths[0]), str(paths[1])
    if folder.exists() or weights.startswith((".", "/")) or weights.count("/") != 1:
        raise FileNotFoundError(f"DALL-E weights not found: {weights!r} is neither a folder nor a Hub repo id.")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(weights, ENCODER_FILE), hf_hub_download(weights, DECODER_FILE)
    except Exception as err:  # offline, missing repo, no network: say what to do instead
        raise OSError(
            f"Could not fetch the DALL-E tokenizer from the Hub repo {weights!r} ({type(err).__name__}: {err}). "
            "Pass a local folder made by conversion/convert_dall_e.py instead, or go online."
        ) from err
