"""Turn a CIM pre-training checkpoint into a Hub repo folder that timm and transformers both load.

    python conversion/export_checkpoint.py --checkpoint RUN/checkpoint-N --out DIR \
        [--card-data model_cards/example_card_data.json] [--with-pretraining] [--overwrite]

The checkpoint is a folder written by ``CIMForPreTraining.save_pretrained`` (directly or through the
Trainer): ``config.json`` with ``model_type: "cim"`` and ``model.safetensors`` (or safetensors shards)
with ``enhancer.*``, ``generator.*`` and ``enhancer_head.*``. Only JSON and safetensors are read: those
files, ``trainer_state.json`` and the run's ``cim_pretrain_config.json`` (the recipe, for the card);
``optimizer.pt``, ``training_args.bin`` and every other pickle are never opened. ``DIR`` receives:

- ``model.safetensors``: the enhancer alone, with timm's key names;
- ``config.json``: timm's half (``architecture``: the stock timm name, ``model_args``,
  ``pretrained_cfg``) and transformers' half (``model_type: "cim"``, ``architectures``, ``auto_map``,
  the CIMConfig fields), so ``timm.create_model("hf-hub:<repo>")`` and ``AutoModel.from_pretrained``
  both read it;
- ``preprocessor_config.json``: ``AutoImageProcessor`` gives timm's own eval transform of that
  ``pretrained_cfg`` (resize, centre crop, mean/std);
- ``configuration_cim.py``, ``modeling_cim.py``: for ``trust_remote_code=True`` without cim-models;
- ``README.md``: the model card, from ``model_cards/template.md``, the config and ``--card-data``;
- ``pretraining/`` with ``--with-pretraining``: the checkpoint's config and weights as they are
  (generator, enhancer, heads), to continue pre-training with ``CIMForPreTraining.from_pretrained``.

Everything is written to a hidden folder next to ``DIR`` and renamed at the end, after the folder
was reloaded through timm (``local-dir:``, i.e. the stock architecture), transformers (``AutoModel``,
``AutoImageProcessor``) and compared with the checkpoint's enhancer on random images: a failed export
leaves nothing in ``DIR``.

Card data (``--card-data``, JSON, every key optional): ``model_name``, ``repo_id``, ``tag``,
``description``, ``license``, ``datasets`` (Hub dataset ids), ``base_model``, ``training`` (the
optimisation recipe actually used: ``epochs``, ``global_batch_size``, ``learning_rate``, ...),
``results`` (measured results only: a list of ``{task, protocol, dataset, dataset_name, split, metric,
metric_name, value, source}``) and ``limitations`` (a list of sentences). See model_cards/README.md.
"""

from __future__ import annotations

import argparse
import ast
import inspect
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
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

import cim_models
from cim_models.evaluation.results import FORMAT as RESULTS_FORMAT
from cim_models.evaluation.results import card_results, read_results
from cim_models.hub.folders import check_output_folder, publish_folder, format_size
from cim_models import CIMConfig
from cim_models.enhancers import HF_HUB_ORGANIZATION, STOCK_ARCHITECTURES
from cim_models.modeling_cim import create_enhancer

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = REPO_ROOT / "model_cards" / "template.md"
REMOTE_CODE_FILES = ("configuration_cim.py", "modeling_cim.py")
REMOTE_CODE_IMPORTS = {"torch", "timm", "transformers"}
AUTO_MAP = {
    "AutoConfig": "configuration_cim.CIMConfig",
    "AutoModel": "modeling_cim.CIMModel",
    "AutoModelForImageClassification": "modeling_cim.CIMForImageClassification",
}
PROCESSOR_TYPE = "TimmWrapperImageProcessor"  # transformers' own: timm's eval transform of pretrained_cfg
# pretrained_cfg keys kept from timm's export: input and head metadata. The source checkpoint's own
# paper, licence and notes (a stock enhancer's augreg cfg, say) are replaced by CIM's.
PRETRAINED_CFG_KEYS = (
    "tag", "custom_load", "input_size", "fixed_input_size", "min_input_size", "interpolation",
    "crop_pct", "crop_mode", "mean", "std", "num_classes", "pool_size", "first_conv", "classifier",
)
CARD_TAGS = ["image-feature-extraction", "timm", "transformers", "cim"]
CHECK_IMAGES = 2
CHECK_SEED = 0

# CIM settings shown in the card: label and where the default comes from (SPEC.md).
CIM_RECIPE_FIELDS = {
    "objective": ("enhancer objective", "paper"),
    "image_size": ("image size", "paper"),
    "patch_size": ("visual-token stride (px)", "paper"),
    "tokenizer": ("image tokenizer", "BEiT"),
    "num_mask_patches": ("masked patches per image", "ours, BEiT's value"),
    "min_mask_patches_per_block": ("min. patches per mask block", "BEiT"),
    "sampling_temperature": ("generator sampling temperature", "ours"),
    "window_size": ("ResPix sliding window", "ours"),
    "enhancer_loss_weight": ("enhancer loss weight (lambda)", "ours"),
    "drop_path_rate": ("enhancer drop path", "ours, BEiT recipe"),
    "generator_num_hidden_layers": ("generator depth", "ours"),
    "generator_hidden_size": ("generator width", "ours: the enhancer's width"),
    "generator_num_attention_heads": ("generator heads", "ours: width / 64"),
    "generator_layer_scale_init_value": ("generator layer scale", "paper, BEiT"),
    "image_mean": ("normalisation mean", "ours"),
    "image_std": ("normalisation std", "ours"),
}
# SPEC.md "Pre-training recipe" [ours, after BEiT's ImageNet-1K recipe]; card data "training" keys.
SPEC_TRAINING = {
    "epochs": 300,
    "global_batch_size": 2048,
    "learning_rate": 1.5e-3,  # peak, for the global batch of 2048, scaled linearly with it
    "warmup_epochs": 10,
    "lr_schedule": "cosine",
    "optimizer": "adamw",
    "adam_betas": [0.9, 0.999],
    "weight_decay": 0.05,
    "max_grad_norm": 3.0,
    "precision": "bf16",
}
OBJECTIVES = {
    "respix": ("ResPix", "restore every original pixel (sliding-window normalised targets)"),
    "revdet": ("RevDet", "tell, token by token, which visual tokens were replaced"),
}


class ExportError(Exception):
    """The checkpoint, card data or result cannot be exported; the message says what to do."""


@dataclass
class Checkpoint:
    path: Path
    config: CIMConfig
    enhancer_state: dict[str, torch.Tensor]
    weight_files: list[str]
    training_state: dict[str, Any] = field(default_factory=dict)  # trainer_state.json
    run_recipe: dict[str, Any] = field(default_factory=dict)  # the run's cim_pretrain_config.json


# ---------------------------------------------------------------------------------------------------
# Reading


def read_checkpoint(path: Path) -> Checkpoint:
    """Config, enhancer weights and training state of a CIM checkpoint folder; JSON and safetensors only."""
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
            f"{config_file} has model_type {found!r}, not 'cim': this script exports CIM pre-training "
            "checkpoints (CIMForPreTraining) only."
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
        except Exception as err:  # safetensors raises its own SafetensorError for a damaged file
            raise ExportError(f"{path / name} is not a readable safetensors file ({err}).") from err
    enhancer_state = {k[len("enhancer.") :]: v for k, v in state.items() if k.startswith("enhancer.")}
    if not enhancer_state:
        raise ExportError(
            f"{path} has no enhancer.* weights (found e.g. {sorted(state)[:3]}); export expects a "
            "CIMForPreTraining checkpoint."
        )
    return Checkpoint(path, config, enhancer_state, weight_files, _training_state(path), _run_recipe(path))


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
            f"{path} holds its weights only as a pickle ({', '.join(pickles)}). Weights move only as "
            "safetensors here and this script never unpickles; re-save the model with "
            "save_pretrained (transformers 5 always writes model.safetensors)."
        )
    raise ExportError(f"{path} has no model.safetensors: not a complete checkpoint folder.")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _training_state(path: Path) -> dict[str, Any]:
    """Step, epoch, batch size and the last kNN monitor value from the Trainer's trainer_state.json."""
    state = _read_json(path / "trainer_state.json")
    keys = ("global_step", "epoch", "max_steps", "train_batch_size")
    summary = {k: state[k] for k in keys if state.get(k) is not None}
    knn = [e for e in state.get("log_history") or [] if isinstance(e, dict) and "eval_knn_top1" in e]
    if knn:
        summary["knn_top1"], summary["knn_step"] = knn[-1]["eval_knn_top1"], knn[-1].get("step")
    return summary


def _run_recipe(path: Path) -> dict[str, Any]:
    """The optimisation recipe cim-pretrain recorded in RUN/cim_pretrain_config.json, in card-data keys."""
    training = _read_json(path.parent / "cim_pretrain_config.json").get("training") or {}
    recipe: dict[str, Any] = {}
    if (training.get("max_steps") or -1) > 0:
        recipe["max_steps"] = training["max_steps"]
    elif "num_train_epochs" in training:
        recipe["epochs"] = training["num_train_epochs"]
    renamed = {
        "learning_rate": "learning_rate", "lr_scheduler_type": "lr_schedule", "optim": "optimizer",
        "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm", "warmup_steps": "warmup_steps",
        "per_device_train_batch_size": "per_device_batch_size",
        "gradient_accumulation_steps": "gradient_accumulation_steps", "seed": "seed",
    }
    recipe.update({new: training[old] for old, new in renamed.items() if old in training})
    if training.get("base_learning_rate"):  # CIMTrainer sets learning_rate from it at run time
        recipe.pop("learning_rate", None)
        recipe["base_learning_rate"] = training["base_learning_rate"]
    warmup, epochs = recipe.get("warmup_steps"), recipe.get("epochs")
    if isinstance(warmup, float) and 0 < warmup < 1 and epochs:  # a fraction of the whole run
        recipe["warmup_epochs"] = round(recipe.pop("warmup_steps") * epochs, 6)
    if "adam_beta1" in training and "adam_beta2" in training:
        recipe["adam_betas"] = [training["adam_beta1"], training["adam_beta2"]]
    if "bf16" in training or "fp16" in training:
        recipe["precision"] = "bf16" if training.get("bf16") else "fp16" if training.get("fp16") else "fp32"
    return recipe


def read_card_data(paths: list[Path]) -> dict[str, Any]:
    """Merge card-data files and the results files of ``cim-eval`` / ``cim-finetune``: a results file
    adds its rows to ``results``, value for value; later card-data keys override earlier ones."""
    card: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ExportError(f"--card-data {path} is not a readable JSON file ({err}).") from err
        if not isinstance(data, dict):
            raise ExportError(f"--card-data {path} must hold a JSON object, got {type(data).__name__}.")
        if data.get("format") == RESULTS_FORMAT:
            try:
                results += card_results(read_results(path))
            except ValueError as err:
                raise ExportError(f"--card-data {err}") from err
            continue
        results += data.get("results") or []
        card.update(data)
    for i, result in enumerate(results):
        missing = [k for k in ("task", "dataset", "metric", "value") if k not in result]
        if missing:
            raise ExportError(f"--card-data: results[{i}] lacks {missing}; see model_cards/README.md.")
    if results:
        card["results"] = results
    return card


# ---------------------------------------------------------------------------------------------------
# The repo's files


def timm_architecture(config: CIMConfig) -> str:
    """The stock timm name the enhancer's weights load into (so the repo needs no cim-models)."""
    return config.enhancer_architecture or STOCK_ARCHITECTURES.get(config.enhancer) or config.enhancer


def default_tag(config: CIMConfig, card: dict[str, Any]) -> str:
    if card.get("tag"):
        return card["tag"]
    return f"{config.objective}_in1k" if "imagenet-1k" in (card.get("datasets") or []) else config.objective


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
            f"The enhancer weights of {checkpoint.path} do not fit {checkpoint.config.enhancer} with "
            f"enhancer_kwargs={checkpoint.config.enhancer_kwargs}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}."
        )
    return enhancer.eval()


def write_weights(enhancer: nn.Module, folder: Path) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in enhancer.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _make_readable(folder / "model.safetensors")


def export_config(
    enhancer: nn.Module, config: CIMConfig, folder: Path, tag: str, license: str
) -> dict[str, Any]:
    """One config.json for both libraries: timm's keys first, then the CIMConfig's."""
    # timm writes its half itself (the reconstruction args of this very model, the input config).
    from timm.models._hub import save_config_for_hf  # what timm.models.save_for_hf calls

    size = config.image_size
    data_config = {
        "input_size": (3, size, size), "mean": tuple(config.image_mean), "std": tuple(config.image_std)
    }
    save_config_for_hf(enhancer, folder / "config.json", data_config=data_config)
    timm_config = json.loads((folder / "config.json").read_text())

    architecture = timm_architecture(config)
    timm_config["architecture"] = architecture
    # timm 1.0.31 records num_classes in model_args too; transformers' TimmWrapper then passes it twice.
    timm_config["model_args"].pop("num_classes", None)
    registered = enhancer.pretrained_cfg if config.enhancer.startswith("cim_") else {}
    pretrained_cfg = {k: v for k, v in timm_config["pretrained_cfg"].items() if k in PRETRAINED_CFG_KEYS}
    pretrained_cfg.update(
        tag=tag,
        num_classes=0,
        license=license,
        paper_ids="arXiv:2202.03382",
        paper_name="Corrupted Image Modeling for Self-Supervised Visual Pre-Training",
    )
    if registered.get("origin_url"):
        pretrained_cfg["origin_url"] = registered["origin_url"]
    timm_config["pretrained_cfg"] = pretrained_cfg

    # The CIMConfig's fields, and of transformers' generic ones only those that differ from their default.
    generic = PretrainedConfig().to_dict()
    cim_fields = set(CIMConfig().to_dict()) - set(generic)
    cim_config = {
        k: v for k, v in config.to_dict().items()
        if k in cim_fields or k in ("model_type", "transformers_version") or generic.get(k, v) != v
    }
    cim_config.pop("_name_or_path", None)
    cim_config.update(
        architectures=["CIMModel"],
        auto_map=dict(AUTO_MAP),
        enhancer_architecture=None if architecture == config.enhancer else architecture,
    )
    # AutoImageProcessor reads config.json, not preprocessor_config.json, for a local folder that has a
    # pretrained_cfg: name the processor there too.
    timm_config["image_processor_type"] = PROCESSOR_TYPE
    return {**timm_config, **dict(sorted(cim_config.items()))}


def preprocessor_config(export: dict[str, Any]) -> dict[str, Any]:
    """AutoImageProcessor -> transformers' TimmWrapperImageProcessor: timm's eval transform, exactly."""
    return {
        "image_processor_type": PROCESSOR_TYPE,
        "architecture": export["architecture"],
        "pretrained_cfg": export["pretrained_cfg"],
    }


def copy_remote_code(folder: Path) -> None:
    """The two files trust_remote_code needs, after checking they import nothing of cim_models."""
    package = Path(cim_models.__file__).parent
    for name in REMOTE_CODE_FILES:
        source = package / name
        for node in ast.walk(ast.parse(source.read_text())):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            for module in modules:
                root = module.split(".")[0]
                if root not in REMOTE_CODE_IMPORTS and root not in sys.stdlib_module_names:
                    raise ExportError(
                        f"{source} imports {module!r}; files shipped for trust_remote_code may import only "
                        "torch, timm, transformers, the standard library and each other."
                    )
        shutil.copyfile(source, folder / name)


def copy_pretraining_state(checkpoint: Checkpoint, folder: Path) -> None:
    target = folder / "pretraining"
    target.mkdir()
    names = ["config.json", *checkpoint.weight_files]
    if len(checkpoint.weight_files) > 1:
        names.append("model.safetensors.index.json")
    for name in names:
        shutil.copyfile(checkpoint.path / name, target / name)


# ---------------------------------------------------------------------------------------------------
# The model card


def build_model_card(
    config: CIMConfig,
    card: dict[str, Any],
    export: dict[str, Any],
    enhancer: nn.Module,
    *,
    repo_id: str,
    training_state: dict[str, Any] | None = None,
    run_recipe: dict[str, Any] | None = None,
    has_pretraining: bool = False,
) -> ModelCard:
    """README.md from model_cards/template.md: metadata through ModelCardData, results only from ``card``."""
    tag = export["pretrained_cfg"]["tag"]
    model_name = card.get("model_name") or repo_id.split("/")[-1]
    license = export["pretrained_cfg"]["license"]
    datasets = list(card.get("datasets") or [])
    results = [_result_row(r) for r in card.get("results") or []]
    eval_results = [
        EvalResult(
            task_type=r["task"],
            dataset_type=r["dataset"],
            dataset_name=r.get("dataset_name") or r["dataset"],
            dataset_split=r.get("split"),
            metric_type=r["metric"],
            metric_name=r.get("metric_name"),
            metric_value=r["value"],
            source_name=r.get("source") if r.get("source_url") else None,  # the Hub wants both or neither
            source_url=r.get("source_url"),
        )
        for r in card.get("results") or []
    ]
    card_data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-feature-extraction",
        tags=[*CARD_TAGS, *[t for t in card.get("tags") or [] if t not in CARD_TAGS]],
        license=license,
        datasets=datasets or None,
        base_model=card.get("base_model"),
        model_name=model_name,
        eval_results=eval_results or None,
    )
    pretrained_cfg = export["pretrained_cfg"]
    objective_name, objective_task = OBJECTIVES[config.objective]
    limitations = list(card.get("limitations") or [])
    if config.tokenizer == "palette":
        limitations.insert(0, "Pre-trained with the weightless `palette` tokenizer, the project's stand-in for "
                           "tests and smoke runs, not the paper's DALL-E dVAE: expect weaker features.")
    elif config.tokenizer_kwargs.get("random_init"):
        limitations.insert(0, "Pre-trained with a randomly initialised DALL-E dVAE (tests and benchmarks), "
                           "not OpenAI's weights: expect weaker features.")
    if not datasets:
        limitations.append("The pre-training data was not recorded with this checkpoint.")
    registered_name = f"{config.enhancer}.{tag}"
    has_registered_tag = timm.models.is_model_pretrained(registered_name)
    model_args = {k: v for k, v in export.get("model_args", {}).items() if k not in ("in_chans", "global_pool")}
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE.read_text(),
        model_name=model_name,
        description=card.get("description")
        or f"An image backbone pre-trained with Corrupted Image Modeling (CIM, {objective_name}).",
        architecture_description=f"timm `{type(enhancer).__name__}`",
        objective_name=objective_name,
        objective_task=objective_task,
        enhancer=config.enhancer,
        architecture=export["architecture"],
        model_args=", ".join(f"{k}={v}" for k, v in model_args.items()),
        params_m=f"{sum(p.numel() for p in enhancer.parameters()) / 1e6:.1f}",
        num_features=export["num_features"],
        global_pool=export.get("global_pool", "avg"),
        image_size=config.image_size,
        resize_size=int(config.image_size / pretrained_cfg.get("crop_pct", 1.0)),
        interpolation=pretrained_cfg.get("interpolation", "bicubic"),
        image_mean=tuple(round(v, 4) for v in config.image_mean),
        image_std=tuple(round(v, 4) for v in config.image_std),
        datasets_text=", ".join(datasets) if datasets else "not recorded",
        license=license,
        cim_recipe=_cim_recipe(config, enhancer),
        training_recipe=_training_recipe({**(run_recipe or {}), **(card.get("training") or {})}),
        training_given=bool(run_recipe or card.get("training")),
        training_state=_training_state_text(training_state or {}),
        results=results,
        repo_id=repo_id,
        timm_call=_timm_call(registered_name, config, enhancer) if has_registered_tag else None,
        has_pretraining=has_pretraining,
        limitations=limitations,
    )


def enhancer_takes_imgformat_size(enhancer: nn.Module) -> bool:
    """Whether the backbone's class is built for one input size (ViT) rather than any (ResNet)."""
    return "img_size" in inspect.signature(type(enhancer).__init__).parameters


def _timm_call(name: str, config: CIMConfig, enhancer: nn.Module) -> str:
    """``timm.create_model`` arguments for the registered name, with the sizes that differ from it."""
    kwargs = dict(config.enhancer_kwargs)
    if enhancer_takes_imgformat_size(enhancer) and config.image_size != 224:
        kwargs["img_size"] = config.image_size
    return ", ".join([f'"{name}"', "pretrained=True", *(f"{k}={v!r}" for k, v in kwargs.items())])


def _result_row(result: dict[str, Any]) -> dict[str, Any]:
    row = {k: result.get(k) or "-" for k in ("task", "protocol", "split", "source")}
    row.update(dataset=result.get("dataset_name") or result["dataset"],
               metric=result.get("metric_name") or result["metric"], value=result["value"])
    return row


def _cim_recipe(config: CIMConfig, enhancer: nn.Module) -> list[dict[str, str]]:
    defaults = CIMConfig()
    width = getattr(enhancer, "embed_dim", 384)  # CIMForPreTraining's default generator width
    derived = {
        "generator_hidden_size": width,
        "generator_num_attention_heads": max((config.generator_hidden_size or width) // 64, 1),
    }
    rows = []
    for key, (label, source) in CIM_RECIPE_FIELDS.items():
        if key == "window_size" and config.objective != "respix":
            continue
        value, default = getattr(config, key), derived.get(key, getattr(defaults, key))
        if value is None:
            value = default
        shown = f"`{value}` (default)" if value == default else f"`{value}`"
        rows.append({"name": label, "value": shown, "default": f"{default} [{source}]"})
    return rows


def _training_recipe(training: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for key, default in SPEC_TRAINING.items():
        shown_default = default
        if key == "learning_rate":  # SPEC.md scales it linearly with the global batch
            if key not in training and "base_learning_rate" in training:
                value, base = training["base_learning_rate"], default * 256 / SPEC_TRAINING["global_batch_size"]
                mark = "(default)" if _is_default(key, value, base) else f"(SPEC.md: {base:.4g})"
                rows.append({"name": "learning_rate per 256 images", "value": f"`{value}` {mark}"})
                continue
            if "global_batch_size" in training:
                default = default * training["global_batch_size"] / SPEC_TRAINING["global_batch_size"]
                shown_default = f"{default:.3g} for this batch"
            else:
                default, shown_default = None, f"{SPEC_TRAINING[key]} per 2048 images, scaled linearly"
        if key not in training:
            rows.append({"name": key, "value": f"not recorded (SPEC.md: {shown_default})"})
            continue
        value = training[key]
        mark = "(default)" if _is_default(key, value, default) else f"(SPEC.md: {shown_default})"
        rows.append({"name": key, "value": f"`{value}` {mark}"})
    shown = {*SPEC_TRAINING, "base_learning_rate"}
    rows += [{"name": k, "value": f"`{v}`"} for k, v in training.items() if k not in shown]
    return rows


def _is_default(key: str, value: Any, default: Any) -> bool:
    if default is None:
        return False
    if key == "optimizer":  # transformers' adamw_torch, adamw_torch_fused, ... are all AdamW
        return str(value).lower().startswith("adamw")
    if isinstance(default, float) and isinstance(value, (int, float)):
        return abs(value - default) <= 1e-9 * max(abs(default), 1.0)
    if isinstance(default, list):
        return list(value) == default
    return value == default


def _training_state_text(state: dict[str, Any]) -> str:
    parts = []
    if "global_step" in state:
        of = f" of {state['max_steps']}" if state.get("max_steps") else ""
        parts.append(f"step {state['global_step']}{of}")
    if "epoch" in state:
        parts.append(f"epoch {state['epoch']:.2f}")
    if "train_batch_size" in state:
        parts.append(f"per-device batch {state['train_batch_size']}")
    if "knn_top1" in state:
        top1, step = state["knn_top1"], state["knn_step"]
        parts.append(f"kNN monitor top-1 {top1:.4g} on the run's eval set at step {step}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------
# Check, then publish


@dataclass
class CheckResult:
    name: str
    max_abs_diff: float


def check_export(folder: Path, enhancer: nn.Module, config: CIMConfig) -> list[CheckResult]:
    """Reload ``folder`` through timm and transformers; raise ExportError unless features match."""
    from transformers import AutoImageProcessor, AutoModel

    generator = torch.Generator().manual_seed(CHECK_SEED)
    images = torch.randn(CHECK_IMAGES, 3, config.image_size, config.image_size, generator=generator)
    with torch.no_grad():
        features = enhancer.forward_features(images)
        pooled = enhancer.forward_head(features, pre_logits=True)
        try:
            timm_model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
            timm_features = timm_model.forward_features(images)
            timm_pooled = timm_model.forward_head(timm_features, pre_logits=True)
        except Exception as err:
            raise ExportError(f"timm could not load the exported folder: {type(err).__name__}: {err}") from err
        try:
            hf_model = AutoModel.from_pretrained(folder).eval()
            hf_outputs = hf_model(images)
            processor = AutoImageProcessor.from_pretrained(folder)
        except Exception as err:
            raise ExportError(
                f"transformers could not load the exported folder: {type(err).__name__}: {err}"
            ) from err
    if not isinstance(hf_model, cim_models.CIMModel):
        raise ExportError(f"AutoModel gave a {type(hf_model).__name__}, not a CIMModel: config.json is wrong.")
    def normalised(data_config: dict[str, Any]) -> dict[str, Any]:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}

    expected = normalised(timm.data.resolve_data_config({}, model=timm_model))
    got = normalised({k: processor.data_config.get(k) for k in expected})
    if got != expected:
        raise ExportError(f"AutoImageProcessor resolves {got}, timm {expected}: preprocessor_config.json is wrong.")
    results = []
    for name, value, reference in (
        (f"timm {type(timm_model).__name__} ({timm_model.pretrained_cfg['architecture']}) features",
         timm_features, features),
        ("timm pooled", timm_pooled, pooled),
        ("transformers CIMModel last_hidden_state", hf_outputs.last_hidden_state, features),
        ("transformers CIMModel pooler_output", hf_outputs.pooler_output, pooled),
    ):
        diff = (value - reference).abs().max().item() if value.shape == reference.shape else float("inf")
        if not diff <= 1e-5:
            raise ExportError(
                f"{name} differ from the checkpoint's enhancer (max |diff| {diff:.3g}, shapes "
                f"{tuple(value.shape)} vs {tuple(reference.shape)}); nothing was written."
            )
        results.append(CheckResult(name, diff))
    return results


@dataclass
class ExportReport:
    out: Path
    repo_id: str
    checks: list[CheckResult]

    def format(self) -> str:
        files = sorted(p for p in self.out.rglob("*") if p.is_file())
        lines = [f"Exported {self.out}:"]
        lines += [f"  {p.relative_to(self.out)!s:32} {format_size(p.stat().st_size):>10}" for p in files]
        lines.append("Reloaded and compared with the checkpoint's enhancer:")
        lines += [f"  {c.name}: max |diff| {c.max_abs_diff:.2g}" for c in self.checks]
        lines.append(f"Publish with: python conversion/push_to_hub.py --folder {self.out} --repo-id {self.repo_id}")
        return "\n".join(lines)


def export(
    checkpoint_path: str | os.PathLike,
    out: str | os.PathLike,
    card_data: str | os.PathLike | list[str | os.PathLike] | None = None,
    with_pretraining: bool = False,
    overwrite: bool = False,
) -> ExportReport:
    """Read, write to a staging folder, check, rename; raise ExportError (``out`` untouched) on failure."""
    out = Path(out)
    check_output_folder(out, overwrite, ExportError)
    checkpoint = read_checkpoint(Path(checkpoint_path))
    card_files = [card_data] if isinstance(card_data, (str, os.PathLike)) else list(card_data or [])
    card = read_card_data([Path(p) for p in card_files])
    config = checkpoint.config
    tag = default_tag(config, card)
    repo_id = card.get("repo_id") or default_repo_id(config, tag)
    enhancer = build_enhancer(checkpoint)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        write_weights(enhancer, staging)
        export_cfg = export_config(enhancer, config, staging, tag, card.get("license") or _license(enhancer))
        (staging / "config.json").write_text(json.dumps(export_cfg, indent=2) + "\n")
        processor_cfg = preprocessor_config(export_cfg)
        (staging / "preprocessor_config.json").write_text(json.dumps(processor_cfg, indent=2) + "\n")
        copy_remote_code(staging)
        if with_pretraining:
            copy_pretraining_state(checkpoint, staging)
        try:
            model_card = build_model_card(
                config, card, export_cfg, enhancer, repo_id=repo_id,
                training_state=checkpoint.training_state, run_recipe=checkpoint.run_recipe,
                has_pretraining=with_pretraining,
            )
        except (TypeError, ValueError) as err:  # ModelCardData / EvalResult validate the card data
            raise ExportError(f"--card-data {card_data}: {err}") from err
        model_card.save(staging / "README.md")
        checks = check_export(staging, enhancer, config)
        publish_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return ExportReport(out, repo_id, checks)


def _make_readable(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # safetensors writes 0600; these files are meant to be published


def _license(enhancer: nn.Module) -> str:
    return getattr(enhancer, "pretrained_cfg", {}).get("license") or "apache-2.0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export a CIM checkpoint as a Hub repo folder for timm and transformers."
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (RUN/checkpoint-N)")
    parser.add_argument("--out", required=True, help="output folder (created; must be empty)")
    parser.add_argument(
        "--card-data", nargs="+", default=[],
        help="JSON files for the model card: card data (see model_cards/README.md) and/or the results "
        "files of cim-eval / cim-finetune (their numbers go into the card's results and model-index)",
    )
    parser.add_argument("--with-pretraining", action="store_true",
                        help="also write pretraining/: generator + enhancer, to continue pre-training")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        report = export(args.checkpoint, args.out, args.card_data, args.with_pretraining, args.overwrite)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
