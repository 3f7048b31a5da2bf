"""``cim-export``: a CIM pre-training checkpoint -> a Hub repo folder that plain timm and plain
transformers load, with no remote code and without cim-models installed.

    cim-export --checkpoint RUN/checkpoint-N --out DIR [--card-data FILE.json ...]
        [--with-pretraining] [--overwrite] [--repo-id ORG/NAME] [--card-template FILE.md]

The checkpoint is a folder written by ``CIMForPreTraining.save_pretrained`` (directly or through
the Trainer). Only JSON and safetensors are read from it: ``config.json``, ``model.safetensors``
(or its shards), ``trainer_state.json`` and the run's ``cim_pretrain_config.json`` (the recipe, for
the card); ``optimizer.pt``, ``training_args.bin`` and every other pickle are never opened.
``DIR`` receives what ``timm.models.save_for_hf`` writes for the enhancer alone:

- ``model.safetensors``: the enhancer's weights with timm's key names;
- ``config.json``: timm's config naming the stock architecture (``vit_base_patch16_224``,
  ``resnet50``) with the sizes in ``model_args`` and the pooling (``global_pool="avg"``,
  ``fc_norm=False``), so ``timm.create_model("hf-hub:<repo>")`` and transformers' built-in timm
  wrapper (``AutoModel``, ``AutoModelForImageClassification``, ``AutoImageProcessor``, the
  ``image-feature-extraction`` pipeline) load it; the CIMConfig under ``"cim_config"``, so that
  ``CIMModel.from_pretrained`` loads it too;
- ``README.md``: the model card;
- ``pretraining/`` with ``--with-pretraining``: the checkpoint's config and weights (generator,
  enhancer, heads), for ``CIMForPreTraining.from_pretrained(<repo>, subfolder="pretraining")``.

Everything is written to a hidden folder next to ``DIR`` and renamed at the end, after the folder
was reloaded through timm, transformers and ``CIMModel`` and compared with the checkpoint's
enhancer: a failed export leaves nothing in ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import PretrainedConfig

from ..configuration_cim import EXPORT_CONFIG_KEY, CIMConfig
from ..enhancers import HF_HUB_ORGANIZATION, STOCK_ARCHITECTURES
from ..modeling_cim import CIMModel, create_enhancer, enhancer_forward
from .folders import check_output_folder, format_size, publish_folder
from .model_card import CardDataError, build_model_card, read_card_data, run_recipe, training_state

PAPER = {
    "paper_ids": "arXiv:2202.03382",
    "paper_name": "Corrupted Image Modeling for Self-Supervised Visual Pre-Training",
}
# pretrained_cfg keys kept from timm's export: input and head metadata, then CIM's own metadata. A
# stock enhancer's source metadata (its paper, licence, notes) does not describe these weights.
PRETRAINED_CFG_KEYS = (
    "tag", "custom_load", "input_size", "fixed_input_size", "min_input_size", "interpolation",
    "crop_pct", "crop_mode", "mean", "std", "num_classes", "pool_size", "first_conv", "classifier",
    "license", "origin_url", *PAPER,
)  # fmt: skip
CHECK_IMAGES = 2
CHECK_TOLERANCE = 1e-5


class ExportError(Exception):
    """The checkpoint, card data or result cannot be exported; the message says what to do."""


@dataclass
class Checkpoint:
    path: Path
    config: CIMConfig
    enhancer_state: dict[str, torch.Tensor]
    weight_files: list[str]
    training_state: dict[str, Any] = field(default_factory=dict)  # from trainer_state.json
    run_recipe: dict[str, Any] = field(default_factory=dict)  # from cim_pretrain_config.json


# --------------------------------------------------------------------------------------------------
# Reading


def read_checkpoint(path: Path) -> Checkpoint:
    """Config, enhancer weights and training state of a checkpoint; JSON and safetensors only."""
    if not path.is_dir():
        raise ExportError(
            f"--checkpoint {path} is not a folder. Pass a checkpoint folder written by the Trainer "
            "(RUN/checkpoint-N) or by CIMForPreTraining.save_pretrained."
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{path} has no config.json, so it is not a CIM checkpoint folder.")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{config_file} is not valid JSON ({err}).") from err
    if not isinstance(raw, dict) or raw.get("model_type") != "cim":
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ExportError(
            f"{config_file} has model_type {found!r}, not 'cim': cim-export exports CIM "
            "pre-training checkpoints (CIMForPreTraining) only."
        )
    try:
        config = CIMConfig.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise ExportError(f"{config_file} is not a valid CIMConfig: {err}") from err
    weight_files = _weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for name in weight_files:
        try:
            state.update(load_file(path / name))
        except Exception as err:  # safetensors raises its own SafetensorError on a damaged file
            raise ExportError(f"{path / name} is not a readable safetensors file ({err}).") from err
    enhancer_state = {
        k.removeprefix("enhancer."): v for k, v in state.items() if k[:9] == "enhancer."
    }
    if not enhancer_state:
        raise ExportError(
            f"{path} has no enhancer.* weights (found e.g. {sorted(state)[:3]}); cim-export "
            "expects a CIMForPreTraining checkpoint."
        )
    return Checkpoint(
        path, config, enhancer_state, weight_files, training_state(path), run_recipe(path)
    )


def _weight_files(path: Path) -> list[str]:
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise ExportError(f"{index} is not a safetensors index ({err}).") from err
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    if any(name.startswith(("pytorch_model", "model")) for name in pickles):
        raise ExportError(
            f"{path} holds its weights only as a pickle ({', '.join(pickles)}). Weights move only "
            "as safetensors and cim-export never unpickles; re-save the model with "
            "save_pretrained (transformers 5 always writes model.safetensors)."
        )
    raise ExportError(f"{path} has no model.safetensors: not a complete checkpoint folder.")


# --------------------------------------------------------------------------------------------------
# Writing


def timm_architecture(config: CIMConfig) -> str:
    """The stock timm name the enhancer's weights load into (so the repo needs no cim-models)."""
    return (
        config.enhancer_architecture or STOCK_ARCHITECTURES.get(config.enhancer) or config.enhancer
    )


def default_tag(config: CIMConfig, card: dict[str, Any]) -> str:
    if card.get("tag"):
        return card["tag"]
    in1k = "imagenet-1k" in (card.get("datasets") or [])
    return f"{config.objective}_in1k" if in1k else config.objective


def default_repo_id(config: CIMConfig, tag: str) -> str:
    name = f"{config.enhancer}.{tag}"
    if timm.models.is_model_pretrained(name):  # a registered tag knows its repo (aliases share one)
        return timm.models.get_pretrained_cfg(name).hf_hub_id
    return f"{HF_HUB_ORGANIZATION}/{name}"


def build_enhancer(checkpoint: Checkpoint) -> nn.Module:
    enhancer = create_enhancer(checkpoint.config)
    missing, unexpected = enhancer.load_state_dict(checkpoint.enhancer_state, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"The enhancer weights of {checkpoint.path} do not fit {checkpoint.config.enhancer} "
            f"with enhancer_kwargs={checkpoint.config.enhancer_kwargs}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    return enhancer.eval()


def cim_config_dict(config: CIMConfig, architecture: str) -> dict[str, Any]:
    """The CIMConfig's own fields, and transformers' generic ones that differ from their default."""
    generic = PretrainedConfig().to_dict()
    own = set(CIMConfig().to_dict()) - set(generic) | {"model_type", "transformers_version"}
    fields = {k: v for k, v in config.to_dict().items() if k in own or generic.get(k, v) != v}
    fields.pop("_name_or_path", None)
    fields["enhancer_architecture"] = architecture
    return dict(sorted(fields.items()))


def save_enhancer(enhancer: nn.Module, config: CIMConfig, folder: Path, tag: str, license: str):
    """``timm.models.save_for_hf`` of the enhancer, under its stock architecture name, plus what
    transformers' timm wrapper and ``CIMConfig`` need; returns the written config.json."""
    architecture = timm_architecture(config)
    cfg = enhancer.pretrained_cfg
    metadata = {"architecture": architecture, "tag": tag, "license": license, **PAPER}
    if config.enhancer.startswith("cim_") and cfg.get("origin_url"):
        metadata["origin_url"] = cfg["origin_url"]
    model_args = {}
    if isinstance(enhancer, VisionTransformer):  # the pooling: no fc_norm, the final norm stays
        model_args["fc_norm"] = not isinstance(enhancer.fc_norm, nn.Identity)
    size = config.image_size
    data_config = {
        "input_size": (3, size, size), "mean": tuple(config.image_mean),
        "std": tuple(config.image_std), "crop_pct": cfg.get("crop_pct", 0.9),
        "interpolation": cfg.get("interpolation", "bicubic"),
    }  # fmt: skip
    save_for_hf(
        enhancer,
        folder,
        model_config={
            "pretrained_cfg": metadata,
            EXPORT_CONFIG_KEY: cim_config_dict(config, architecture),
        },
        model_args=model_args,
        safe_serialization=True,
        data_config=data_config,
    )
    export = json.loads((folder / "config.json").read_text())
    # transformers' TimmWrapper passes num_classes itself: a second one is a TypeError.
    export["model_args"].pop("num_classes", None)
    pretrained_cfg = export["pretrained_cfg"]
    export["pretrained_cfg"] = {k: v for k, v in pretrained_cfg.items() if k in PRETRAINED_CFG_KEYS}
    (folder / "config.json").write_text(json.dumps(export, indent=2) + "\n")
    _make_readable(folder / "model.safetensors")
    return export


def copy_pretraining_state(checkpoint: Checkpoint, folder: Path) -> None:
    target = folder / "pretraining"
    target.mkdir()
    names = ["config.json", *checkpoint.weight_files]
    if len(checkpoint.weight_files) > 1:
        names.append("model.safetensors.index.json")
    for name in names:
        shutil.copyfile(checkpoint.path / name, target / name)


def _make_readable(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # safetensors writes 0600; these files are meant to be published


# --------------------------------------------------------------------------------------------------
# Check, then publish


@dataclass
class CheckResult:
    name: str
    max_abs_diff: float


def check_export(folder: Path, enhancer: nn.Module, config: CIMConfig) -> list[CheckResult]:
    """Reload ``folder`` through timm, transformers and CIMModel; raise ExportError unless they
    give the checkpoint's features and pooled feature."""
    from transformers import AutoImageProcessor, AutoModel, TimmWrapperModel

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(CHECK_IMAGES, 3, config.image_size, config.image_size, generator=generator)
    outputs = {}
    with torch.no_grad():
        features, pooled, _ = enhancer_forward(enhancer, images)
        for name, load in (
            ("timm local-dir:", lambda: timm.create_model(f"local-dir:{folder}", pretrained=True)),
            ("transformers AutoModel", lambda: AutoModel.from_pretrained(folder)),
            ("CIMModel", lambda: CIMModel.from_pretrained(folder)),
        ):
            try:
                model = load().eval()
                if isinstance(model, nn.Module) and hasattr(model, "forward_head"):
                    outputs[name] = enhancer_forward(model, images)[:2]
                else:
                    out = model(pixel_values=images)
                    outputs[name] = (out.last_hidden_state, out.pooler_output)
            except Exception as err:
                raise ExportError(
                    f"{name} could not load the exported folder: {type(err).__name__}: {err}"
                ) from err
            if name == "transformers AutoModel" and not isinstance(model, TimmWrapperModel):
                raise ExportError(
                    f"AutoModel gave a {type(model).__name__}, not transformers' TimmWrapperModel: "
                    "config.json would need cim-models to load."
                )
            if name == "timm local-dir:":
                expected = _data_config(timm.data.resolve_data_config({}, model=model))
    processor = AutoImageProcessor.from_pretrained(folder)
    got = _data_config({k: processor.data_config.get(k) for k in expected})
    if got != expected:
        raise ExportError(
            f"AutoImageProcessor resolves {got}, timm {expected}: config.json is wrong."
        )
    results = []
    for name, (value_features, value_pooled) in outputs.items():
        for what, value, reference in (
            ("features", value_features, features),
            ("pooled feature", value_pooled, pooled),
        ):
            same_shape = value.shape == reference.shape
            diff = (value - reference).abs().max().item() if same_shape else float("inf")
            if not diff <= CHECK_TOLERANCE:
                raise ExportError(
                    f"{name} {what} differ from the checkpoint's enhancer (max |diff| "
                    f"{diff:.3g}, shapes {tuple(value.shape)} vs {tuple(reference.shape)}); "
                    "nothing was written."
                )
            results.append(CheckResult(f"{name} {what}", diff))
    return results


def _data_config(data_config: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}


@dataclass
class ExportReport:
    out: Path
    repo_id: str
    checks: list[CheckResult]

    def format(self) -> str:
        files = sorted(p for p in self.out.rglob("*") if p.is_file())
        lines = [f"Exported {self.out}:"]
        lines += [
            f"  {p.relative_to(self.out)!s:32} {format_size(p.stat().st_size):>10}" for p in files
        ]
        lines.append("Reloaded and compared with the checkpoint's enhancer:")
        lines += [f"  {c.name}: max |diff| {c.max_abs_diff:.2g}" for c in self.checks]
        lines.append(f"Publish with: cim-push --folder {self.out} --repo-id {self.repo_id}")
        return "\n".join(lines)


def export(
    checkpoint_path: str | os.PathLike,
    out: str | os.PathLike,
    card_data: str | os.PathLike | list[str | os.PathLike] | None = None,
    with_pretraining: bool = False,
    overwrite: bool = False,
    repo_id: str | None = None,
    card_template: str | os.PathLike | None = None,
) -> ExportReport:
    """Read, write to a staging folder, check, rename; raise ExportError (``out`` untouched)."""
    out = Path(out)
    check_output_folder(out, overwrite, ExportError)
    checkpoint = read_checkpoint(Path(checkpoint_path))
    card_files = [card_data] if isinstance(card_data, (str, os.PathLike)) else card_data or []
    try:
        card = read_card_data([Path(p) for p in card_files])
    except CardDataError as err:
        raise ExportError(str(err)) from err
    config = checkpoint.config
    tag = default_tag(config, card)
    repo_id = repo_id or card.get("repo_id") or default_repo_id(config, tag)
    if card_template is not None and not Path(card_template).is_file():
        raise ExportError(f"--card-template {card_template} is not a file.")
    enhancer = build_enhancer(checkpoint)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        license = card.get("license") or enhancer.pretrained_cfg.get("license") or "apache-2.0"
        export_config = save_enhancer(enhancer, config, staging, tag, license)
        if with_pretraining:
            copy_pretraining_state(checkpoint, staging)
        try:
            model_card = build_model_card(
                config, card, export_config, enhancer, repo_id=repo_id,
                training_state=checkpoint.training_state, run_recipe=checkpoint.run_recipe,
                has_pretraining=with_pretraining, template=card_template,
            )  # fmt: skip
        except (TypeError, ValueError) as err:  # ModelCardData / EvalResult validate the card data
            raise ExportError(f"--card-data {card_data}: {err}") from err
        model_card.save(staging / "README.md")
        checks = check_export(staging, enhancer, config)
        publish_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return ExportReport(out, repo_id, checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cim-export",
        description="Export a CIM pre-training checkpoint as a Hub repo folder that timm and "
        "transformers load without cim-models.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (RUN/checkpoint-N)")
    parser.add_argument("--out", required=True, help="output folder (created; must be empty)")
    parser.add_argument(
        "--card-data", nargs="+", default=[],
        help="JSON files for the model card: card data (model_name, repo_id, tag, description, "
        "license, datasets, training, results, limitations) and/or the results files of cim-eval "
        "/ cim-finetune (their numbers go into the card's results and model-index)",
    )  # fmt: skip
    parser.add_argument(
        "--with-pretraining", action="store_true",
        help="also write pretraining/: generator + enhancer, to continue pre-training",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--repo-id", help="the repo the card's usage names (default: from timm)")
    parser.add_argument("--card-template", help="a Jinja model card template to use instead")
    args = parser.parse_args(argv)
    try:
        report = export(
            args.checkpoint, args.out, args.card_data, args.with_pretraining, args.overwrite,
            repo_id=args.repo_id, card_template=args.card_template,
        )  # fmt: skip
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
