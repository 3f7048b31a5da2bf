"""What a training command resolves from its flags before it trains: which flags were given, the
learning rate, the checkpoint to resume from. Shared by ``cim-pretrain`` and ``cim-finetune``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data import argument

logger = logging.getLogger(__name__)

__all__ = [
    "RunArguments",
    "explicit_flags",
    "find_last_checkpoint",
    "global_batch_size",
    "parse_known",
    "prepare_output_dir",
    "quiet_replicas",
    "resolve_learning_rate",
    "use_fast_cpu_math",
]

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_COMPLETE_MARKER = "trainer_state.json"  # the Trainer writes it last when saving a checkpoint


def explicit_flags(argv: Sequence[str]) -> set[str]:
    """The argument names given on the command line (``--learning_rate 1e-3``,
    ``--learning-rate=1e-3``): what a preset's defaults must not replace."""
    names = set()
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            names.add(token[2:].split("=", 1)[0].replace("-", "_"))
    return names


def parse_known(argv: Sequence[str], **defaults: str | None) -> argparse.Namespace:
    """The values of a few flags, read before the full parser exists (``--preset`` picks its
    defaults); unknown flags are left alone."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag, default in defaults.items():  # HfArgumentParser also accepts --flag-name
        parser.add_argument(f"--{flag}", f"--{flag.replace('_', '-')}", dest=flag, default=default)
    return parser.parse_known_args(list(argv))[0]


def global_batch_size(args: TrainingArguments) -> int:
    """Images per optimizer step over all processes."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def resolve_learning_rate(
    args: TrainingArguments, base_learning_rate: float | None, explicit: set[str]
) -> str:
    """Set ``args.learning_rate`` and return how it was chosen, for the log.

    An explicit ``--learning_rate`` is the rate used. Otherwise a base rate per 256 images (the
    BEiT/MAE convention, given by ``--base_learning_rate`` or a preset) gives
    ``base * global batch / 256``. Both given explicitly is refused: they would disagree.
    """
    if "learning_rate" in explicit and "base_learning_rate" in explicit:
        raise ValueError(
            f"Both --learning_rate ({args.learning_rate}) and --base_learning_rate "
            f"({base_learning_rate}) were given; pass one: --learning_rate is the rate used, "
            "--base_learning_rate is per 256 images and scales with the global batch."
        )
    if "learning_rate" in explicit or not base_learning_rate:
        source = "explicit --learning_rate" if "learning_rate" in explicit else "default"
        return f"learning_rate = {args.learning_rate:g} ({source})"
    batch = global_batch_size(args)
    args.learning_rate = base_learning_rate * batch / 256
    _refill_deepspeed_auto(args)
    return (
        f"learning_rate = {args.learning_rate:g} (base_learning_rate {base_learning_rate:g} per "
        f"256 images x global batch {batch} / 256)"
    )


def _refill_deepspeed_auto(args: TrainingArguments) -> None:
    """Fill a DeepSpeed config's ``"auto"`` values again, from the resolved learning rate.

    ``TrainingArguments`` fills them when it is built, which is before the learning rate is scaled;
    a config with an ``"optimizer"`` or ``"scheduler"`` block would then run at the unscaled rate.
    """
    if not args.deepspeed:
        return
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
    args.hf_deepspeed_config.trainer_config_process(args)
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)


def find_last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir``; ``None`` if there is none.

    A checkpoint without ``trainer_state.json`` was cut off while saving (the run was killed): it
    is skipped with a warning and the one before it is taken.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if path.is_dir() and (match := _CHECKPOINT.match(path.name))
    )
    for _, path in reversed(steps):
        if (path / _COMPLETE_MARKER).is_file():
            return str(path)
        logger.warning(
            "Skipping %s: it has no %s, so it was not completely saved (the run stopped while "
            "saving); resuming from the checkpoint before it.",
            path,
            _COMPLETE_MARKER,
        )
    return None


def prepare_output_dir(args: TrainingArguments, overwrite_output_dir: bool = False) -> None:
    """Resolve ``args.resume_from_checkpoint`` the way transformers' example scripts do.

    ``last`` or ``true``: the newest complete checkpoint in ``output_dir`` (an error if none); a
    path: that checkpoint. Not given: an output folder that holds checkpoints is resumed from the
    newest, a non-empty one without checkpoints is refused unless ``overwrite_output_dir`` (then it
    is emptied, on the main process).
    """
    output_dir = args.output_dir
    wanted = args.resume_from_checkpoint
    if overwrite_output_dir:
        if wanted:
            raise ValueError(
                f"--overwrite_output_dir empties {output_dir}, so it cannot be combined with "
                f"--resume_from_checkpoint {wanted}; pass one of them."
            )
        if args.process_index == 0 and os.path.isdir(output_dir) and os.listdir(output_dir):
            logger.warning("--overwrite_output_dir: removing the contents of %s", output_dir)
            shutil.rmtree(output_dir)
        return
    if wanted is not None and str(wanted).lower() in ("last", "true"):
        last = find_last_checkpoint(output_dir)
        if last is None:
            raise ValueError(
                f"--resume_from_checkpoint {wanted}: no complete checkpoint-* folder in "
                f"{output_dir}; pass a checkpoint folder, or leave the flag out to start afresh."
            )
        args.resume_from_checkpoint = last
    elif wanted is not None and str(wanted).lower() == "false":
        args.resume_from_checkpoint = None
    elif wanted:
        if not os.path.isdir(wanted):
            raise ValueError(
                f"--resume_from_checkpoint {wanted}: no such folder; pass a checkpoint-N folder, "
                "or `last` for the newest one in --output_dir."
            )
    else:
        last = find_last_checkpoint(output_dir)
        if last is not None:
            logger.info("%s holds checkpoints: resuming from %s", output_dir, last)
            args.resume_from_checkpoint = last
        elif os.path.isdir(output_dir) and _has_results(output_dir):
            raise ValueError(
                f"Output folder {output_dir} is not empty and holds no checkpoint to resume from; "
                "pass another --output_dir, or --overwrite_output_dir to replace its contents."
            )


def _has_results(folder: str) -> bool:
    # Folders the run writes before its first checkpoint (logs, its own config) do not count.
    ignored = {"runs", "cim_pretrain_config.json", "image_grids"}
    return any(name not in ignored and not name.startswith(".") for name in os.listdir(folder))


def quiet_replicas(args: TrainingArguments) -> None:
    """Only the main process logs at INFO; the others keep to warnings (one copy of each line)."""
    if not args.should_log:
        logging.getLogger("cim_models").setLevel(logging.WARNING)


def use_fast_cpu_math(args: TrainingArguments) -> None:
    """On a CPU, flush denormal floats to zero: AdamW's second moments underflow into them, which
    x86 CPUs handle ~50x slower."""
    if args.use_cpu or not torch.cuda.is_available():
        torch.set_flush_denormal(True)


@dataclass
class RunArguments(TrainingArguments):
    """``TrainingArguments`` plus the flags our training commands add to it."""

    overwrite_output_dir: bool = argument(
        False,
        "Empty a non-empty --output_dir that holds no checkpoint before training (without it such "
        "a folder is refused, and one with checkpoints is resumed).",
    )
