"""The model card of an exported CIM checkpoint: ``README.md`` from the packaged template, and
the inputs it is filled from (card data, ``cim-eval`` / ``cim-finetune`` results files, the run's
recorded recipe and training state).

The YAML metadata goes through ``huggingface_hub.ModelCardData`` and the text through
``ModelCard.from_template``. The card says what the checkpoint is, how it was trained (the CIM
settings of its config and the optimisation recipe its run recorded, each printed once), how to
load it, and cites the paper. Results come only from the card data: "Not yet evaluated" otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from ..configuration_cim import CIMConfig
from ..evaluation.results import FORMAT as RESULTS_FORMAT
from ..evaluation.results import card_results, read_results

TEMPLATE = Path(__file__).with_name("model_card_template.md")
CARD_TAGS = ["image-feature-extraction", "timm", "transformers", "cim"]
OBJECTIVES = {
    "respix": ("ResPix", "restore every original pixel (sliding-window normalised targets)"),
    "revdet": ("RevDet", "tell, token by token, which visual tokens were replaced"),
}
# The CIM settings shown in the card: label, and where the default comes from ([paper]: the CIM
# paper; [BEiT]: BEiT's code; [ours]: cim-models' choice where the paper is silent).
CIM_RECIPE_FIELDS = {
    "objective": ("enhancer objective", "paper"),
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
}
# The reference ImageNet-1K pre-training recipe (after BEiT's), in card-data "training" keys.
REFERENCE_TRAINING = {
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


class CardDataError(ValueError):
    """A card-data or results file cannot be used; the message says what is wrong."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def training_state(path: Path) -> dict[str, Any]:
    """Step, epoch, batch size and the last kNN monitor value from trainer_state.json."""
    state = _read_json(path / "trainer_state.json")
    keys = ("global_step", "epoch", "max_steps", "train_batch_size")
    summary = {k: state[k] for k in keys if state.get(k) is not None}
    log = [e for e in state.get("log_history") or [] if isinstance(e, dict)]
    knn = [e for e in log if "eval_knn_top1" in e]
    if knn:
        summary["knn_top1"], summary["knn_step"] = knn[-1]["eval_knn_top1"], knn[-1].get("step")
    return summary


def run_recipe(path: Path) -> dict[str, Any]:
    """The optimisation recipe cim-pretrain recorded next to its checkpoints, in card-data keys."""
    training = _read_json(path.parent / "cim_pretrain_config.json").get("training") or {}
    recipe: dict[str, Any] = {}
    if (training.get("max_steps") or -1) > 0:
        recipe["max_steps"] = training["max_steps"]
    elif "num_train_epochs" in training:
        recipe["epochs"] = training["num_train_epochs"]
    renamed = {
        "learning_rate": "learning_rate", "lr_scheduler_type": "lr_schedule", "optim": "optimizer",
        "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm",
        "warmup_steps": "warmup_steps", "per_device_train_batch_size": "per_device_batch_size",
        "gradient_accumulation_steps": "gradient_accumulation_steps", "seed": "seed",
    }  # fmt: skip
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
        precision = "bf16" if training.get("bf16") else "fp16" if training.get("fp16") else "fp32"
        recipe["precision"] = precision
    return recipe


def read_card_data(paths: list[Path]) -> dict[str, Any]:
    """Merge card-data files and the results files of ``cim-eval`` / ``cim-finetune``: a results
    file adds its rows to ``results``; later card-data keys override earlier ones."""
    card: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CardDataError(f"--card-data {path} is not a readable JSON file ({err}).") from err
        if not isinstance(data, dict):
            raise CardDataError(
                f"--card-data {path} must hold a JSON object, got {type(data).__name__}."
            )
        if data.get("format") == RESULTS_FORMAT:
            try:
                results += card_results(read_results(path))
            except ValueError as err:
                raise CardDataError(f"--card-data {err}") from err
            continue
        results += data.get("results") or []
        card.update(data)
    for i, result in enumerate(results):
        missing = [k for k in ("task", "dataset", "metric", "value") if k not in result]
        if missing:
            raise CardDataError(
                f"--card-data: results[{i}] lacks {missing}; every result needs task, dataset, "
                "metric and value, and may add protocol, dataset_name, split, metric_name, source "
                "and source_url."
            )
    if results:
        card["results"] = results
    return card


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
    template: str | Path | None = None,
) -> ModelCard:
    """The card of an export: ``export`` is its config.json, ``card`` the card data."""
    pretrained_cfg = export["pretrained_cfg"]
    tag, license = pretrained_cfg["tag"], pretrained_cfg["license"]
    model_name = card.get("model_name") or repo_id.split("/")[-1]
    datasets = list(card.get("datasets") or [])
    card_data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-feature-extraction",
        tags=[*CARD_TAGS, *[t for t in card.get("tags") or [] if t not in CARD_TAGS]],
        license=license,
        datasets=datasets or None,
        base_model=card.get("base_model"),
        model_name=model_name,
        eval_results=[_eval_result(r) for r in card.get("results") or []] or None,
    )
    objective_name, objective_task = OBJECTIVES[config.objective]
    limitations = list(card.get("limitations") or [])
    if config.tokenizer == "palette":
        limitations.insert(
            0,
            "Pre-trained with the weightless `palette` tokenizer, a stand-in for tests and smoke "
            "runs, not the paper's DALL-E dVAE: expect weaker features.",
        )
    elif config.tokenizer_kwargs.get("random_init"):
        limitations.insert(
            0,
            "Pre-trained with a randomly initialised DALL-E dVAE (tests and benchmarks), not "
            "OpenAI's weights: expect weaker features.",
        )
    if not datasets:
        limitations.append("The pre-training data was not recorded with this checkpoint.")
    registered = f"{config.enhancer}.{tag}"
    model_args = {
        k: v for k, v in export["model_args"].items() if k not in ("in_chans", "global_pool")
    }
    crop_pct = pretrained_cfg.get("crop_pct", 1.0)
    template_text = Path(template).read_text() if template else TEMPLATE.read_text()
    return ModelCard.from_template(
        card_data,
        template_str=template_text,
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
        pooling=_pooling_text(export),
        image_size=config.image_size,
        resize_size=int(config.image_size / crop_pct),
        interpolation=pretrained_cfg.get("interpolation", "bicubic"),
        image_mean=tuple(round(v, 4) for v in config.image_mean),
        image_std=tuple(round(v, 4) for v in config.image_std),
        datasets_text=", ".join(datasets) if datasets else "not recorded",
        license=license,
        cim_recipe=_cim_recipe(config, enhancer),
        training_recipe=_training_recipe({**(run_recipe or {}), **(card.get("training") or {})}),
        training_given=bool(run_recipe or card.get("training")),
        training_state=_training_state_text(training_state or {}),
        results=[_result_row(r) for r in card.get("results") or []],
        repo_id=repo_id,
        timm_call=_timm_call(registered, config, enhancer) if _is_registered(registered) else None,
        has_pretraining=has_pretraining,
        limitations=limitations,
    )


def _is_registered(name: str) -> bool:
    return timm.models.is_model_pretrained(name)


def _pooling_text(export: dict[str, Any]) -> str:
    pool, token_backbone = export.get("global_pool"), "fc_norm" in export["model_args"]
    if pool == "avg" and token_backbone and not export["model_args"]["fc_norm"]:
        return "mean of the patch tokens after the final norm"
    if pool == "avg" and not token_backbone:
        return "average of the last feature map"
    return f"output of timm's `global_pool={pool!r}`"


def _eval_result(result: dict[str, Any]) -> EvalResult:
    return EvalResult(
        task_type=result["task"],
        dataset_type=result["dataset"],
        dataset_name=result.get("dataset_name") or result["dataset"],
        dataset_split=result.get("split"),
        metric_type=result["metric"],
        metric_name=result.get("metric_name"),
        metric_value=result["value"],
        # The Hub wants a source name and URL together, or neither.
        source_name=result.get("source") if result.get("source_url") else None,
        source_url=result.get("source_url"),
    )


def _timm_call(name: str, config: CIMConfig, enhancer: nn.Module) -> str:
    """``timm.create_model`` arguments for the registered name, with the sizes that differ."""
    kwargs = dict(config.enhancer_kwargs)
    if hasattr(enhancer, "patch_embed") and config.image_size != 224:
        kwargs["img_size"] = config.image_size
    return ", ".join([f'"{name}"', "pretrained=True", *(f"{k}={v!r}" for k, v in kwargs.items())])


def _result_row(result: dict[str, Any]) -> dict[str, Any]:
    row = {k: result.get(k) or "-" for k in ("task", "protocol", "split", "source")}
    row.update(
        dataset=result.get("dataset_name") or result["dataset"],
        metric=result.get("metric_name") or result["metric"],
        value=result["value"],
    )
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
        default = derived.get(key, getattr(defaults, key))
        value = default if getattr(config, key) is None else getattr(config, key)
        shown = f"`{value}` (default)" if value == default else f"`{value}`"
        rows.append({"name": label, "value": shown, "default": f"{default} [{source}]"})
    return rows


def _training_recipe(training: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for key, default in REFERENCE_TRAINING.items():
        shown_default = default
        if key == "learning_rate":  # the reference scales it linearly with the global batch
            reference_batch = REFERENCE_TRAINING["global_batch_size"]
            if key not in training and "base_learning_rate" in training:
                value, base = training["base_learning_rate"], default * 256 / reference_batch
                mark = "(default)" if _is_default(key, value, base) else f"(reference: {base:.4g})"
                rows.append({"name": "learning_rate per 256 images", "value": f"`{value}` {mark}"})
                continue
            if "global_batch_size" in training:
                default = default * training["global_batch_size"] / reference_batch
                shown_default = f"{default:.3g} for this batch"
            else:
                default = None
                shown_default = f"{REFERENCE_TRAINING[key]} per 2048 images, scaled linearly"
        if key not in training:
            rows.append({"name": key, "value": f"not recorded (reference: {shown_default})"})
            continue
        value = training[key]
        mark = "(default)" if _is_default(key, value, default) else f"(reference: {shown_default})"
        rows.append({"name": key, "value": f"`{value}` {mark}"})
    shown = {*REFERENCE_TRAINING, "base_learning_rate"}
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


__all__ = [
    "CARD_TAGS",
    "REFERENCE_TRAINING",
    "TEMPLATE",
    "CardDataError",
    "build_model_card",
    "read_card_data",
    "run_recipe",
    "training_state",
]
