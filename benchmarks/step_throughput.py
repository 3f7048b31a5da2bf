"""Images per second of a CIM training step, against a plain supervised step of the same enhancer.

In one process, after warm-up, it alternates rounds of (a) a supervised step of the stock timm model
(cross-entropy on random labels) and (b) the CIM step as a Trainer runs it (``CIMForPreTraining``
forward, backward, gradient clipping, AdamW), with the same batch, precision, optimizer and compile
setting. It reports the median step time and images/s of each, the ratio (b)/(a), FLOPs per step
counted by ``torch.utils.flop_counter`` and the TFLOP/s that gives, peak memory, and a per-stage
breakdown of (b): separate steps that run the model's own ``forward`` with each of its stage methods
(``tokenize``, ``generate``, ``sample``, ``corrupt``, ``enhance``, the losses) timed, then each
loss's backward and the optimizer. A change to a stage method is timed without editing this file.

With no flags it fits the device: on a GPU the full-size step (vit_base, bf16, batch 128, 30
steps); on a CPU a tiny one (64 px, fp32, batch 16, 10 steps) that runs in about a minute.

    export PYTHONPATH=.   # from the repository root; works without pip install -e .
    python benchmarks/step_throughput.py                      # sized for the device
    python benchmarks/step_throughput.py --preset tiny --device cpu --threads 1
    python benchmarks/step_throughput.py --preset vit_base --precision bf16 --batch-size 128 \\
        --compile
    python benchmarks/step_throughput.py --preset resnet50 --precision bf16 --batch-size 128 \\
        --compile --channels-last --json resnet50.json

The tokenizer is the DALL-E dVAE architecture with random weights (speed does not depend on them).
It runs in its own precision whatever the step's: fp16 on CUDA, fp32 elsewhere (``DallETokenizer``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import platform
import resource
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cim_models import BlockMaskingGenerator, CIMConfig, CIMForPreTraining
from cim_models.enhancers import STOCK_ARCHITECTURES
from cim_models.tokenizers import DallETokenizer
from cim_models.tokenizers.dall_e import map_pixels

# The tiny DALL-E of the tests: the real code path, 0.24 M parameters.
TINY_DALL_E = dict(random_init=True, n_hid=16, n_blk_per_group=1, vocab_size=512, n_init=32)

# Generator: depth 4, as wide as the enhancer (384 for ResNet-50).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        enhancer="cim_vit_tiny_patch16_224",
        enhancer_kwargs=dict(patch_size=8, depth=6),
        image_size=64,
        patch_size=8,
        num_mask_patches=24,  # 75/196 of the 8x8 grid
        generator_hidden_size=192,
        tokenizer_kwargs=TINY_DALL_E,
    ),
    "vit_small": dict(enhancer="cim_vit_small_patch16_224", generator_hidden_size=384),
    "vit_base": dict(enhancer="cim_vit_base_patch16_224", generator_hidden_size=768),
    "resnet50": dict(enhancer="cim_resnet50", generator_hidden_size=384),
}
PRESETS["tiny_resnet"] = {
    **PRESETS["tiny"],
    "enhancer": "cim_resnet50",
    "enhancer_kwargs": dict(layers=(1, 1, 1, 1)),
}
# Reported stage -> the parts it adds up: CIMForPreTraining's stage methods, each loss's backward
# and the optimizer step.
STAGES: dict[str, tuple[str, ...]] = {
    "tokenize": ("tokenize",),
    "generator": ("generate", "generator_loss", "generator_backward"),
    "sample_decode": ("sample", "corrupt"),
    "enhancer": ("enhance", "enhancer_loss", "enhancer_backward"),
    "optimizer": ("optimizer",),
}
STAGE_METHODS = [m for parts in STAGES.values() for m in parts if hasattr(CIMForPreTraining, m)]
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Defaults that fit the device: the full-size step on a GPU, a one-minute tiny step on a CPU.
DEVICE_DEFAULTS = {
    "cuda": dict(
        preset="vit_base", precision="bf16", batch_size=128, steps=30, warmup=5, breakdown_steps=10
    ),
    "cpu": dict(
        preset="tiny", precision="fp32", batch_size=16, steps=10, warmup=2, breakdown_steps=5
    ),
}


# --- Models, batches, steps -----------------------------------------------------------------------


class Trainee:
    """A model with its optimizer, autocast and GradScaler: what a Trainer step does to it."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace, device: torch.device):
        self.model, self.device = model, device
        self.dtype = DTYPES[args.precision]
        self.params = [p for p in model.parameters() if p.requires_grad]  # never the tokenizer
        self.optimizer = torch.optim.AdamW(
            self.params, lr=1e-4, weight_decay=0.05, fused=device.type == "cuda"
        )
        self.scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
        self.max_grad_norm = args.max_grad_norm

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def forward_backward(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        with self.autocast():
            loss = loss_fn()
        self.backward(loss)

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        self.forward_backward(loss_fn)
        self.optimizer_step()

    def optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def cim_config(args: argparse.Namespace) -> CIMConfig:
    preset = dict(PRESETS[args.preset])
    if args.enhancer:
        preset["enhancer"] = args.enhancer
        preset["enhancer_kwargs"] = json.loads(args.enhancer_kwargs or "{}")
    preset.setdefault("tokenizer_kwargs", {"random_init": True})
    return CIMConfig(tokenizer="dall-e", objective=args.objective, **preset)


def stock_model(config: CIMConfig) -> torch.nn.Module:
    """The stock timm classifier of the enhancer's architecture, 1000 classes."""
    name = STOCK_ARCHITECTURES.get(config.enhancer, config.enhancer)
    kwargs = {
        "num_classes": 1000,
        "drop_path_rate": config.drop_path_rate,
        **config.enhancer_kwargs,
    }
    try:
        return timm.create_model(name, **{"img_size": config.image_size, **kwargs})
    except TypeError:  # CNNs take no img_size
        return timm.create_model(name, **kwargs)


def make_batch(model: CIMForPreTraining, batch_size: int, device, channels_last: bool, seed=0):
    """Random images as the collator gives them: normalised view, tokenizer view in [0, 1],
    masks."""
    rng = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    images = torch.rand(batch_size, 3, size, size, generator=rng)
    tokenizer_view = F.interpolate(images, size=model.tokenizer_image_size, mode="area")
    masking = BlockMaskingGenerator(model.config.grid_size, model.config.num_mask_patches)
    masks = torch.stack([masking(rng) for _ in range(batch_size)])
    mean, std = model.image_mean.cpu(), model.image_std.cpu()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    batch = {
        "pixel_values": ((images - mean) / std).contiguous(memory_format=fmt),
        "tokenizer_pixel_values": tokenizer_view.contiguous(memory_format=fmt),
        "bool_masked_pos": masks,
        "labels": torch.randint(0, 1000, (batch_size,), generator=rng),
    }
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def compile_modules(model: torch.nn.Module, mode: str | None) -> None:
    """torch.compile each module in place (``forward_features`` too, which the CIM step calls)."""
    if isinstance(model, CIMForPreTraining):
        model.generator.compile(mode=mode)
        model.enhancer.forward_features = torch.compile(model.enhancer.forward_features, mode=mode)
        model.enhancer_head.compile(mode=mode)
        if isinstance(model.tokenizer, DallETokenizer):
            model.tokenizer.encoder.compile(mode=mode)
            decoder = model.tokenizer.decoder
            decoder.forward_ids = torch.compile(decoder.forward_ids, mode=mode)
    else:
        model.compile(mode=mode)


# --- The CIM step, stage by stage -----------------------------------------------------------------


@contextlib.contextmanager
def stage_methods_in(model: CIMForPreTraining, stage: Callable[[str], Any]):
    """Run every stage method of ``model`` inside ``stage(name)`` (a timer or a FLOP counter), so
    that ``model(...)`` itself reports its stages; the methods are restored on exit."""

    def wrap(name: str, method: Callable) -> Callable:
        def staged(*args, **kwargs):
            with stage(name):
                return method(*args, **kwargs)

        return staged

    for name in STAGE_METHODS:
        setattr(model, name, wrap(name, getattr(model, name)))  # shadows the class's method
    try:
        yield
    finally:
        for name in STAGE_METHODS:
            delattr(model, name)


def staged_step(
    model: CIMForPreTraining, trainee: Trainee, inputs: dict, stage: Callable, optimizer=True
) -> None:
    """One CIM step, the model's forward with its stages reported to ``stage``, then each loss's
    backward on its own: the two losses share no graph, so this equals backpropagating their sum."""
    with stage_methods_in(model, stage), trainee.autocast():
        output = model(**inputs)
    with stage("generator_backward"):
        trainee.backward(output.generator_loss)
    with stage("enhancer_backward"):
        trainee.backward(model.config.enhancer_loss_weight * output.enhancer_loss)
    if optimizer:
        with stage("optimizer"):
            trainee.optimizer_step()


# --- Token agreement of the low-precision encoder -------------------------------------------------


def smooth_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, size, size) in [0, 1]: bicubic colour fields with a few flat discs and bars, the
    smooth regions and hard edges of photos (uniform noise is nothing like what a dVAE sees)."""
    rng = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=rng)
    images = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for image in images:
        for _ in range(4):
            cx, cy, r = (
                torch.rand(3, generator=rng) * torch.tensor([size, size, size / 3])
            ).tolist()
            colour = torch.rand(3, 1, 1, generator=rng)
            if torch.rand((), generator=rng) < 0.5:
                inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= (r + 2) ** 2
            else:
                inside = ((xx - cx).abs() <= r + 2) & ((yy - cy).abs() <= r / 2 + 2)
            image.copy_(torch.where(inside, 0.3 * image + 0.7 * colour, image))
    return images.clamp(0, 1)


@contextlib.contextmanager
def full_fp32():
    """No autocast and no TF32 (``main`` turns TF32 on for CUDA): the fp32 reference."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def encoder_tokens(tokenizer: DallETokenizer, images: torch.Tensor, dtype: torch.dtype | None):
    """DALL-E tokens with the encoder under ``dtype`` autocast (None: full fp32), bypassing the
    tokenizer's own precision policy."""
    x = map_pixels(images.float()).contiguous(memory_format=torch.channels_last)
    if dtype is None:
        with full_fp32(), torch.autocast(images.device.type, enabled=False):
            return tokenizer.encoder(x).float().argmax(1)
    with torch.autocast(images.device.type, dtype=dtype):
        return tokenizer.encoder(x).float().argmax(1)


def token_agreement(
    tokenizer: DallETokenizer,
    images: torch.Tensor,
    dtype: torch.dtype | None = None,
    batch_size: int = 32,
) -> float:
    """Fraction of positions where the tokenizer gives its full-fp32 token.

    ``dtype=None`` tests the tokens as the CIM step gets them: ``tokenizer.encode`` in the precision
    the tokenizer chooses itself (fp16 on CUDA, fp32 elsewhere). A dtype instead forces the encoder
    under that autocast (e.g. bf16, to see why the tokenizer does not use it).
    """
    device = next(tokenizer.parameters()).device
    agree = total = 0
    for chunk in images.split(batch_size):
        chunk = chunk.to(device)
        expected = encoder_tokens(tokenizer, chunk, None)
        if dtype is None:
            tokens = tokenizer.encode(chunk)
        else:
            tokens = encoder_tokens(tokenizer, chunk, dtype)
        agree += (tokens == expected).sum().item()
        total += expected.numel()
    return agree / total


# --- Measurement ----------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Wall time of named stages per step, synchronising the device at both ends."""

    def __init__(self, device: torch.device):
        self.device, self.steps = device, []

    def new_step(self) -> None:
        self.steps.append(defaultdict(float))

    @contextlib.contextmanager
    def __call__(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.steps[-1][name] += time.perf_counter() - start

    def median_ms(self, names: tuple[str, ...]) -> float:
        """Median over the steps of the time spent in ``names`` together."""
        return 1e3 * statistics.median(sum(step[n] for n in names) for step in self.steps)


class StageFlops:
    """FLOPs of named stages, one FlopCounterMode each."""

    def __init__(self):
        self.flops = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        with FlopCounterMode(display=False) as counter:
            yield
        self.flops[name] = self.flops.get(name, 0) + counter.get_total_flops()


def peak_memory(device: torch.device, step: Callable[[], None], base: int = 0) -> float:
    """GiB: on CUDA the allocator's peak during one step minus ``base``; on CPU the process's
    peak RSS."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**30
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def warm_up(step: Callable[[], None], count: int, device, base: int = 0) -> tuple[float, float]:
    """Run ``count`` steps, the last one measuring peak memory; (peak GiB, seconds taken)."""
    start = time.perf_counter()
    for _ in range(max(count - 1, 0)):
        step()
    return peak_memory(device, step, base), time.perf_counter() - start


def time_rounds(steps: dict[str, Callable[[], None]], total: int, rounds: int, device) -> dict:
    """Alternate the workloads round by round; per-step seconds of each round, per workload."""
    per_round = [total // rounds + (i < total % rounds) for i in range(rounds)]
    times = {name: [] for name in steps}
    for count in per_round:
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(count):
                step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / count)
    return times


def hardware(device: torch.device) -> dict[str, Any]:
    info = {
        "device": device.type,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="default: vit_base on a GPU, tiny on a CPU"
    )
    parser.add_argument("--enhancer", help="timm name overriding the preset's enhancer")
    parser.add_argument("--enhancer-kwargs", help="JSON kwargs for --enhancer")
    parser.add_argument("--objective", choices=("respix", "revdet"), default="respix")
    parser.add_argument("--batch-size", type=int, help="default: 128 on a GPU, 16 on a CPU")
    parser.add_argument(
        "--precision", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every module")
    parser.add_argument(
        "--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune"
    )
    parser.add_argument("--channels-last", action="store_true", help="model and inputs NHWC")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--steps", type=int, help="timed steps of each workload; default: 30 on a GPU, 10 on a CPU"
    )
    parser.add_argument("--rounds", type=int, default=None, help="alternation rounds (<= steps)")
    parser.add_argument(
        "--warmup", type=int, help="untimed steps of each (compiles); default: 5 GPU, 2 CPU"
    )
    parser.add_argument(
        "--breakdown-steps", type=int, help="instrumented CIM steps; default: 10 GPU, 5 CPU"
    )
    parser.add_argument("--max-grad-norm", type=float, default=3.0, help="0 turns clipping off")
    parser.add_argument(
        "--check-tokens",
        type=int,
        default=0,
        metavar="N",
        help="also measure how often the step's tokens (the tokenizer's own precision: fp16 on "
        "CUDA, fp32 elsewhere) equal full-fp32 tokens, on N smooth synthetic images",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    defaults = DEVICE_DEFAULTS["cuda" if torch.device(args.device).type == "cuda" else "cpu"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
            if name == "breakdown_steps":  # a default never outnumbers the timed steps
                args.breakdown_steps = max(1, min(value, args.steps))
    args.rounds = min(args.rounds or min(args.steps, 10), args.steps)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(arguments)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    # (b) the CIM model: built, FLOP-counted (eager), compiled, warmed up, peak memory, first, so
    # its peak memory is measured while nothing else is resident.
    config = cim_config(args)
    cim = CIMForPreTraining(config).to(device, memory_format=memory_format).train()
    batch = make_batch(cim, args.batch_size, device, args.channels_last, args.seed)
    cim_inputs = {
        k: batch[k] for k in ("pixel_values", "tokenizer_pixel_values", "bool_masked_pos")
    }
    cim_trainee = Trainee(cim, args, device)
    counter = StageFlops()
    staged_step(cim, cim_trainee, cim_inputs, counter, optimizer=False)  # forward + backward
    cim_trainee.optimizer.zero_grad(set_to_none=True)
    agreement = None
    if args.check_tokens:  # eager, before compiling
        images = smooth_images(args.check_tokens, cim.tokenizer_image_size, args.seed)
        agreement = token_agreement(cim.tokenizer, images)
    if args.compile:
        compile_modules(cim, args.compile_mode)
    cim_step = functools.partial(cim_trainee.step, lambda: cim(**cim_inputs).loss)
    cim_memory, cim_warmup_s = warm_up(cim_step, args.warmup, device)

    # (a) the supervised step of the stock model.
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    stock = stock_model(config).to(device, memory_format=memory_format).train()
    images, labels = batch["pixel_values"].clone(), batch["labels"]
    stock_trainee = Trainee(stock, args, device)
    supervised_loss = lambda: F.cross_entropy(stock(images).float(), labels)
    with FlopCounterMode(display=False) as supervised_counter:
        stock_trainee.forward_backward(supervised_loss)
    stock_trainee.optimizer.zero_grad(set_to_none=True)
    if args.compile:
        compile_modules(stock, args.compile_mode)
    supervised_step = functools.partial(stock_trainee.step, supervised_loss)
    supervised_memory, supervised_warmup_s = warm_up(supervised_step, args.warmup, device, base)

    # Alternating timed rounds, then the instrumented CIM steps.
    times = time_rounds(
        {"supervised": supervised_step, "cim": cim_step}, args.steps, args.rounds, device
    )
    timer = StageTimer(device)
    whole = []
    for _ in range(args.breakdown_steps):
        timer.new_step()
        start = time.perf_counter()
        staged_step(cim, cim_trainee, cim_inputs, timer)
        whole.append(time.perf_counter() - start)

    flops = {
        "supervised": supervised_counter.get_total_flops(),
        "cim": sum(counter.flops.values()),
    }
    memory = {"supervised": supervised_memory, "cim": cim_memory}
    warmup_s = {"supervised": supervised_warmup_s, "cim": cim_warmup_s}
    results: dict[str, Any] = {}
    for name in ("supervised", "cim"):
        step_s = statistics.median(times[name])
        results[name] = {
            "step_ms": 1e3 * step_s,
            "images_per_s": args.batch_size / step_s,
            "best_step_ms": 1e3 * min(times[name]),  # the least disturbed round on a shared host
            "round_step_ms": [1e3 * t for t in times[name]],
            "gflop_per_image": flops[name] / args.batch_size / 1e9,
            "tflop_per_s": flops[name] / step_s / 1e12,
            "peak_memory_gib": memory[name],
            "warmup_s": warmup_s[name],
        }
    parts = [part for stage_parts in STAGES.values() for part in stage_parts]
    stage_ms = {stage: timer.median_ms(stage_parts) for stage, stage_parts in STAGES.items()}
    results["cim"]["stages_ms"] = stage_ms
    results["cim"]["parts_ms"] = {part: timer.median_ms((part,)) for part in parts}
    results["cim"]["stages_sum_ms"] = timer.median_ms(tuple(parts))
    results["cim"]["instrumented_step_ms"] = 1e3 * statistics.median(whole)
    results["cim"]["stages_gflop_per_image"] = {
        stage: sum(counter.flops.get(part, 0) for part in stage_parts) / args.batch_size / 1e9
        for stage, stage_parts in STAGES.items()
    }
    if agreement is not None:
        results["token_agreement"] = agreement
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/step_throughput.py", *arguments]),
        "hardware": hardware(device),
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("json", "enhancer")},
            "enhancer": config.enhancer,
            "stock_model": STOCK_ARCHITECTURES.get(config.enhancer, config.enhancer),
            "enhancer_kwargs": config.enhancer_kwargs,
            "image_size": config.image_size,
            "tokenizer_image_size": cim.tokenizer_image_size,
            "mask": f"{config.num_mask_patches} of {config.grid_size}x{config.grid_size}",
            "generator": f"depth {config.generator_num_hidden_layers}, "
            f"width {config.generator_hidden_size}",
            "tokenizer_precision": "fp16" if device.type == "cuda" else "fp32",
            "peak_memory": "cuda max_memory_allocated in one step"
            if device.type == "cuda"
            else "process peak RSS (CPU)",
        },
        **results,
        "ratio": results["cim"]["images_per_s"] / results["supervised"]["images_per_s"],
    }
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_report(report: dict[str, Any]) -> None:
    c, hw = report["config"], report["hardware"]
    where = hw.get("gpu", f"{hw['cpu']}, torch threads: {hw['cpu_threads']}")
    flags = [c["precision"]] + ["compiled"] * c["compile"] + ["channels_last"] * c["channels_last"]
    print(
        f"{c['preset']} ({c['enhancer']}), {c['objective']}, batch {c['batch_size']}, "
        f"{', '.join(flags)}; {hw['device']} ({where}), torch {hw['torch']}"
    )
    print(
        f"{'step':<26} | {'ms/step':>9} | {'img/s':>8} | {'GFLOP/img':>9} | {'TFLOP/s':>8} | "
        f"{'peak GiB':>8}"
    )
    for name, title in (("supervised", f"(a) {c['stock_model']}"), ("cim", "(b) CIM")):
        r = report[name]
        print(
            f"{title:<26} | {r['step_ms']:9.1f} | {r['images_per_s']:8.1f} | "
            f"{r['gflop_per_image']:9.2f} | {r['tflop_per_s']:8.3f} | {r['peak_memory_gib']:8.2f}"
        )
    print(f"ratio (b)/(a): {report['ratio']:.3f}x  (peak memory: {c['peak_memory']})")
    if "token_agreement" in report:
        print(
            f"tokens ({c['tokenizer_precision']}, as the step runs the tokenizer) equal to "
            f"full-fp32 ones: {100 * report['token_agreement']:.2f} % of positions "
            f"({c['check_tokens']} smooth synthetic images)"
        )
    cim = report["cim"]
    print(f"CIM stages, median of {c['breakdown_steps']} instrumented steps:")
    for stage, parts in STAGES.items():
        ms = cim["stages_ms"][stage]
        split = ", ".join(f"{part} {cim['parts_ms'][part]:.2f}" for part in parts)
        gflop = cim["stages_gflop_per_image"][stage]
        print(
            f"  {stage:<14} {ms:9.2f} ms  {100 * ms / cim['stages_sum_ms']:5.1f} %  "
            f"{gflop:8.2f} GFLOP/img  {f'({split})' if len(parts) > 1 else ''}"
        )
    print(
        f"  {'sum of stages':<14} {cim['stages_sum_ms']:9.2f} ms; instrumented step "
        f"{cim['instrumented_step_ms']:.2f} ms; uninstrumented step {cim['step_ms']:.2f} ms"
    )


if __name__ == "__main__":
    main()
