"""The data flags every command shares, and the field helper the commands' argument classes use.

``cim-pretrain``, ``cim-eval`` and ``cim-finetune`` subclass :class:`DataArguments` with the flags
only they have; ``cim_models.data.sources.load_split`` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataArguments", "argument"]


def argument(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field for ``HfArgumentParser``: its default and its ``--help`` text (plus any
    argparse setting such as ``choices``)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class DataArguments:
    """Where the images come from: image folders, a Hugging Face dataset, or the built-in synthetic
    shapes when neither is given."""

    train_dir: str | None = argument(
        None, "Image folder (recursive; class sub-folders give the labels)."
    )
    validation_dir: str | None = argument(None, "Labelled image folder to measure on.")
    dataset_name: str | None = argument(
        None, "Hugging Face dataset name or path (needs `datasets`)."
    )
    dataset_config_name: str | None = argument(None, "Its configuration name.")
    train_split: str = argument("train", "Split to train on.")
    validation_split: str | None = argument("validation", "Split to measure on.")
    image_column_name: str | None = argument(None, "Image column (default: image/img).")
    label_column_name: str | None = argument(None, "Label column (default: label/labels).")
    synthetic_train_samples: int = argument(3000, "Built-in data: training images.")
    synthetic_eval_samples: int = argument(1000, "Built-in data: validation images.")
    strict_data: bool = argument(False, "Stop at an unreadable image instead of skipping it.")

    @property
    def user_data(self) -> bool:
        """Whether the flags name the user's own images (folders or a dataset)."""
        return bool(self.train_dir or self.validation_dir or self.dataset_name)
