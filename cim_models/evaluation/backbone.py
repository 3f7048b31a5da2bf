"""Where an evaluated backbone comes from: one function for every command.

A source is any of
- a ``cim-pretrain`` run folder (``RUN``: the final model) or one of its checkpoints
  (``RUN/checkpoint-N``): ``config.json`` with ``model_type: "cim"`` and ``model.safetensors`` with
  ``enhancer.*`` keys (the generator and heads in it are ignored);
- a folder written by ``cim-export`` (timm's config with the CIMConfig under ``cim_config``, timm
  key names) or by ``save_pretrained``;
- a Hub repo id of either (``org/name``; ``--model_revision`` picks a branch, tag or commit).

A run folder whose final model is not written yet gives its last ``checkpoint-N``. Every source
loads through ``from_pretrained``, which adds or strips the ``enhancer.`` prefix per key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from ..configuration_cim import EXPORT_CONFIG_KEY, CIMConfig
from ..modeling_cim import CIMForImageClassification, CIMModel
from ..training.arguments import find_last_checkpoint

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass
class ImageSettings:
    """The evaluation input of a backbone: size and normalisation from its CIMConfig, crop and
    interpolation from its timm pretrained cfg."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str


def resolve_source(source: str) -> str:
    """The folder or Hub id that holds the model named by ``source`` (see the module docstring)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES):
            return str(path.resolve())
        last = find_last_checkpoint(path)  # skips a checkpoint cut off while saving
        if last is not None:
            return str(Path(last).resolve())
        raise ValueError(
            f"{source} is a folder but holds no model: expected config.json and "
            "model.safetensors (a cim-pretrain run or checkpoint, or an exported repo folder), or "
            "checkpoint-N folders."
        )
    if path.exists():
        raise ValueError(
            f"{source} is a file; pass the folder that holds config.json and model.safetensors."
        )
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local or (os.sep != "/" and os.sep in source):
        raise FileNotFoundError(
            f"No folder {source}: pass a cim-pretrain run or checkpoint folder, an exported "
            "folder, or a Hub repo id (org/name)."
        )
    return source  # a Hub repo id


@dataclass
class ModelSource:
    """A located CIM model: the name as given, where it resolved to, and its config."""

    name: str
    path: str  # a local folder or a Hub repo id
    revision: str | None
    config: CIMConfig

    @property
    def description(self) -> str:
        """``path``, with the Hub revision for a repo id."""
        local = os.path.isdir(self.path)
        return self.path if local else f"{self.path}@{self.revision or 'main'}"

    @property
    def fingerprint(self) -> str:
        """Identifies the weights: weight file path, size and mtime; or Hub id and revision."""
        for name in WEIGHT_FILES:
            path = Path(self.path) / name
            if path.is_file():
                stat = path.stat()
                return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
        return self.description


def find_model(source: str, revision: str | None = None) -> ModelSource:
    """Locate ``source`` and read its config; raises with what to pass if it is not a CIM model."""
    path = resolve_source(source)
    try:
        raw, _ = PretrainedConfig.get_config_dict(path, revision=revision)
    except OSError as err:
        raise OSError(
            f"Cannot load {source!r}: it is not a local folder, and as a Hub repo id it failed "
            f"({err}). Check the name and the network (HF_HUB_OFFLINE), or pass a local folder."
        ) from err
    # A checkpoint says model_type "cim"; a cim-export folder is timm's config with ours inside.
    if raw.get("model_type") != "cim" and not isinstance(raw.get(EXPORT_CONFIG_KEY), dict):
        raise ValueError(
            f"{source} has model_type {raw.get('model_type')!r}, not 'cim'. Pass a CIM model: a "
            "cim-pretrain run or checkpoint, a folder cim-export wrote, or its "
            "Hub repo."
        )
    return ModelSource(source, path, revision, CIMConfig.from_dict(raw))


def load_classifier(
    model: ModelSource,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    drop_path_rate: float | None = None,
) -> CIMForImageClassification:
    """The backbone of ``model`` with a new linear classifier of ``num_labels`` outputs."""
    kwargs: dict = {"num_labels": num_labels, "revision": model.revision}
    if id2label:
        kwargs.update(id2label=dict(id2label), label2id={v: k for k, v in id2label.items()})
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    return CIMForImageClassification.from_pretrained(model.path, **kwargs)


def load_backbone(model: ModelSource) -> CIMModel:
    """The frozen backbone of ``model`` (eval mode, no stochastic depth), for features."""
    return CIMModel.from_pretrained(model.path, revision=model.revision, drop_path_rate=0.0).eval()


def image_settings(
    model: CIMModel | CIMForImageClassification, crop_pct: float | None = None
) -> ImageSettings:
    """Input size and mean/std from the model's CIMConfig; crop and interpolation from its timm
    cfg (``crop_pct`` overrides the crop)."""
    config = model.config
    pretrained_cfg = getattr(model.enhancer, "pretrained_cfg", None) or {}
    return ImageSettings(
        image_size=config.image_size,
        mean=tuple(config.image_mean),
        std=tuple(config.image_std),
        crop_pct=crop_pct or pretrained_cfg.get("crop_pct") or 0.875,
        interpolation=pretrained_cfg.get("interpolation") or "bicubic",
    )


def default_output_dir(source: str, prefix: str) -> str:
    """``<prefix>-<model folder name>`` next to a local model folder (never inside it: exported
    folders are uploaded whole, checkpoint folders get rotated), or in the working folder for a
    Hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path.resolve()
        return str(path.parent / f"{prefix}-{path.name}")
    return f"{prefix}-{source.rstrip('/').split('/')[-1]}"
