"""``cim-finetune`` and ``cim-eval {knn,linear}``: how good is a CIM backbone?

    cim-eval knn     --model_name_or_path RUN          # k-NN on frozen pooled features
    cim-eval linear  --model_name_or_path RUN          # linear probe on the same (cached) features
    cim-finetune     --model_name_or_path RUN          # full fine-tuning with the paper's recipes

All three take the same model flags (a cim-pretrain run or checkpoint folder, an exported folder, or
a Hub repo id) and data flags (image folders, a Hugging Face dataset, or the built-in synthetic
shapes), and write a results JSON (``cim_models.evaluation.results``) to their output folder.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import HfArgumentParser, TrainingArguments, set_seed

from ..data import ClassificationCollator, argument, create_eval_transform
from ..training.arguments import (
    RunArguments,
    explicit_flags,
    global_batch_size,
    parse_known,
    prepare_output_dir,
    quiet_replicas,
    resolve_learning_rate,
    use_fast_cpu_math,
)
from .backbone import (
    ImageSettings,
    ModelSource,
    default_output_dir,
    find_model,
    image_settings,
    load_backbone,
    load_classifier,
)
from .data import DataArguments, LabelledData, load_labelled_data
from .features import cached_features
from .finetune import (
    FINETUNE_PRESETS,
    FinetuneTrainer,
    RecipeArguments,
    create_mixup,
    train_transform,
)
from .knn import knn_accuracy
from .linear_probe import LINEAR_PROBE_PRESETS, evaluate_probe, train_linear_probe
from .metrics import topk_metrics, topk_predictions
from .results import build_results, write_results

logger = logging.getLogger("cim_models.evaluation")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class ModelArguments:
    """The backbone to evaluate."""

    model_name_or_path: str = field(
        metadata={
            "help": "A cim-pretrain run or checkpoint folder, a folder cim-export wrote, or a Hub "
            "repo id."
        }
    )
    model_revision: str | None = argument(None, "Hub branch, tag or commit.")
    eval_crop_pct: float | None = argument(
        None, "Centre-crop fraction of the evaluation transform (default: the model's timm cfg)."
    )


@dataclass
class EvalArguments:
    """Where results go and how features are computed."""

    output_dir: str | None = argument(
        None, "Results folder (default: eval-<model folder name> next to the model folder)."
    )
    batch_size: int = argument(256, "Images per forward pass when computing features.")
    num_workers: int = argument(4, "DataLoader worker processes.")
    device: str | None = argument(None, "cuda, cpu, ... (default: cuda when available).")
    use_cache: bool = argument(
        True, "Reuse and keep the features in output_dir/features.safetensors."
    )
    seed: int = argument(0, "Seed of the linear probe.")
    disable_tqdm: bool = argument(False, "No progress bars.")


@dataclass
class KNNArguments:
    """k-NN classification (InstDisc/DINO): cosine similarity, votes weighted by exp(sim / T)."""

    k: int = argument(20, "Neighbours that vote.")
    temperature: float = argument(0.07, "Vote temperature T.")


@dataclass
class LinearProbeArguments:
    """The linear probe (MAE: BatchNorm without affine + linear); defaults come from --preset."""

    preset: str = argument(
        "tiny", f"One of {sorted(LINEAR_PROBE_PRESETS)}.", choices=sorted(LINEAR_PROBE_PRESETS)
    )
    optimizer: str = argument("momentum", "timm optimizer: lars (MAE), momentum (SGD), adamw, ...")
    base_learning_rate: float = argument(1.0, "Learning rate per 256 images.")
    train_batch_size: int = argument(256, "Features per step.")
    epochs: int = argument(100, "Passes over the training features.")
    warmup_epochs: float = argument(10, "Linear warm-up, then cosine decay.")
    weight_decay: float = argument(0.0, "Weight decay of the linear layer.")


# --------------------------------------------------------------------------------------------------
# Shared pieces


def _parse(parser: HfArgumentParser, argv: list[str]) -> tuple:
    """Flags, or one JSON / YAML file holding them all."""
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        yaml = argv[0].endswith(("yaml", "yml"))
        return (parser.parse_yaml_file if yaml else parser.parse_json_file)(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _transform_record(settings: ImageSettings) -> dict[str, Any]:
    return {
        "image_size": settings.image_size,
        "crop_pct": settings.crop_pct,
        "interpolation": settings.interpolation,
        "mean": list(settings.mean),
        "std": list(settings.std),
    }


def _eval_collator(settings: ImageSettings) -> ClassificationCollator:
    transform = create_eval_transform(
        settings.image_size, settings.mean, settings.std, settings.crop_pct, settings.interpolation
    )
    return ClassificationCollator(transform)


def _summary(results: dict[str, Any], path: Path) -> str:
    metrics, dataset = results["metrics"], results["dataset"]
    return (
        f"{results['protocol']}: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% on "
        f"{dataset['name']} {dataset['split']} ({results['num_eval_samples']} images), "
        f"{results['runtime_seconds']:.0f} s\n  results: {path}"
    )


# --------------------------------------------------------------------------------------------------
# cim-eval


EVAL_USAGE = """usage: cim-eval {knn,linear} --model_name_or_path MODEL [options]

  knn     k-nearest-neighbour classification on frozen pooled features (cosine, k=20, T=0.07)
  linear  linear probe on frozen pooled features (MAE: BatchNorm without affine + linear)

Both cache the features in OUTPUT_DIR/features.safetensors and write
OUTPUT_DIR/knn_results.json or OUTPUT_DIR/linear_probe_results.json.
`cim-eval knn --help` lists every option."""


def eval_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(EVAL_USAGE)
        return 0 if argv else 2
    command, argv = argv[0], argv[1:]
    if command not in ("knn", "linear"):
        print(f"cim-eval: unknown command {command!r}\n\n{EVAL_USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    protocol_args = KNNArguments if command == "knn" else LinearProbeArguments
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, EvalArguments, protocol_args), prog=f"cim-eval {command}"
    )
    if command == "linear":
        preset = parse_known(argv, preset="tiny").preset
        if preset not in LINEAR_PROBE_PRESETS:
            parser.error(f"unknown preset {preset!r}; choose one of {sorted(LINEAR_PROBE_PRESETS)}")
        parser.set_defaults(**LINEAR_PROBE_PRESETS[preset])
    model_args, data_args, eval_args, protocol = _parse(parser, argv)
    try:
        results, path = run_eval(command, model_args, data_args, eval_args, protocol)
    except (OSError, ValueError, ImportError) as err:
        print(f"cim-eval {command}: error: {err}", file=sys.stderr)
        return 1
    print(_summary(results, path))
    return 0


def run_eval(
    command: str,
    model_args: ModelArguments,
    data_args: DataArguments,
    eval_args: EvalArguments,
    protocol: KNNArguments | LinearProbeArguments,
) -> tuple[dict[str, Any], Path]:
    """Features (cached), then kNN or the linear probe; returns the results and the JSON's path."""
    started = time.perf_counter()
    source = find_model(model_args.model_name_or_path, model_args.model_revision)
    output_dir = eval_args.output_dir or default_output_dir(model_args.model_name_or_path, "eval")
    device = _device(eval_args.device)
    backbone = load_backbone(source)
    settings = image_settings(backbone, model_args.eval_crop_pct)
    data = load_labelled_data(data_args, settings.image_size)
    collator = _eval_collator(settings)
    fingerprint = {
        "weights": source.fingerprint,
        "data": data.fingerprint,
        "transform": repr(collator.transform),
        **_transform_record(settings),
    }
    features = cached_features(
        backbone.enhancer.to(device),
        {"train": data.train, "validation": data.validation},
        collator,
        output_dir,
        fingerprint,
        eval_args.batch_size,
        eval_args.num_workers,
        device,
        eval_args.use_cache,
        eval_args.disable_tqdm,
    )
    (train_x, train_y), (val_x, val_y) = features["train"], features["validation"]  # (N, D), (N,)
    common = {
        "features": "pooled pre-logits of the frozen backbone (timm forward_head("
        "pre_logits=True)), from the evaluation transform",
        **_transform_record(settings),
    }

    if command == "knn":
        accuracy = knn_accuracy(
            F.normalize(train_x, dim=1).to(device),
            train_y.to(device),
            F.normalize(val_x, dim=1).to(device),
            val_y.to(device),
            k=protocol.k,
            temperature=protocol.temperature,
            topk=(1, 5),
        )
        metrics = {"top1": accuracy[1], "top5": accuracy[5]}
        task, name = "knn", f"kNN (k={protocol.k}, T={protocol.temperature})"
        recipe = {
            "k": protocol.k,
            "temperature": protocol.temperature,
            "similarity": "cosine",
            "vote": "sum of exp(similarity / T) per class",
            **common,
        }
    else:
        probe = train_linear_probe(
            train_x,
            train_y,
            data.num_classes,
            protocol.optimizer,
            protocol.base_learning_rate,
            protocol.train_batch_size,
            protocol.epochs,
            protocol.warmup_epochs,
            protocol.weight_decay,
            eval_args.seed,
            device,
            eval_args.disable_tqdm,
        )
        metrics = evaluate_probe(probe, val_x, val_y)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        weights = {k: v.contiguous().cpu() for k, v in probe.state_dict().items()}
        save_file(weights, str(Path(output_dir) / "linear_probe.safetensors"))
        batch = min(protocol.train_batch_size, len(train_x))
        task = "linear_probe"
        name = f"linear probe (BatchNorm + linear, {protocol.preset} recipe)"
        recipe = {
            **asdict(protocol),
            "learning_rate": protocol.base_learning_rate * batch / 256,
            "effective_batch_size": batch,
            "seed": eval_args.seed,
            "head": "BatchNorm1d(affine=False, eps=1e-6) + Linear",
            **common,
        }
    results = build_results(
        task,
        name,
        model_args.model_name_or_path,
        source.description,
        data.description,
        metrics,
        recipe,
        len(train_y),
        len(val_y),
        time.perf_counter() - started,
    )
    return results, write_results(results, output_dir)


# --------------------------------------------------------------------------------------------------
# cim-finetune


def parse_finetune_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, RecipeArguments, RunArguments]:
    """The four argument groups, with the preset's defaults, the learning rate, the optimizer and
    the checkpoint to resume from resolved."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, RecipeArguments, RunArguments), prog="cim-finetune"
    )
    pre = parse_known(argv, preset="tiny", output_dir=None, model_name_or_path=None)
    if pre.preset not in FINETUNE_PRESETS:
        parser.error(f"unknown preset {pre.preset!r}; choose one of {sorted(FINETUNE_PRESETS)}")
    output_dir = pre.output_dir
    if output_dir is None and pre.model_name_or_path:
        output_dir = default_output_dir(pre.model_name_or_path, "finetune")
    # The preset changes defaults, so every explicit flag still wins.
    parser.set_defaults(
        output_dir=output_dir,
        remove_unused_columns=False,
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning only speeds copies to a GPU
        **FINETUNE_PRESETS[pre.preset],
    )
    model_args, data_args, recipe, training_args = _parse(parser, argv)
    explicit = _explicit(argv)
    try:
        _resolve_recipe(recipe, training_args, explicit)
        training_args.learning_rate_source = resolve_learning_rate(
            training_args, recipe.base_learning_rate, explicit
        )
        prepare_output_dir(training_args, training_args.overwrite_output_dir)
    except ValueError as err:
        parser.error(str(err))
    return model_args, data_args, recipe, training_args


def _explicit(argv: list[str]) -> set[str]:
    """The flags given: on the command line, or every key of a JSON / YAML arguments file."""
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        import yaml  # a transformers dependency; reads JSON too

        return set(yaml.safe_load(Path(argv[0]).read_text()) or {})
    return explicit_flags(argv)


def _resolve_recipe(recipe: RecipeArguments, args: RunArguments, explicit: set[str]) -> None:
    """The Trainer's own flags for what the recipe also sets: ``--optim`` picks a transformers
    optimizer over the recipe's layer-decay groups instead of the timm ``--optimizer``;
    ``--label_smoothing_factor`` is the recipe's ``--label_smoothing``. Both of a pair at once is
    refused."""
    for ours, theirs in (("optimizer", "optim"), ("label_smoothing", "label_smoothing_factor")):
        if ours in explicit and theirs in explicit:
            raise ValueError(
                f"Both --{ours} and --{theirs} were given; pass one (--{theirs} is the Trainer's "
                f"name for what --{ours} sets)."
            )
    recipe.trainer_optimizer = "optim" in explicit
    if "label_smoothing_factor" in explicit:
        recipe.label_smoothing = args.label_smoothing_factor
    args.label_smoothing_factor = 0.0  # the recipe's loss smooths; the Trainer's must not again


def finetune_main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    model_args, data_args, recipe, training_args = parse_finetune_args(argv)
    quiet_replicas(training_args)
    use_fast_cpu_math(training_args)
    try:
        trainer, data, source = build_finetune(model_args, data_args, recipe, training_args)
    except (OSError, ValueError, ImportError) as err:
        print(f"cim-finetune: error: {err}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        seconds = time.perf_counter() - started
        results = finetune_results(trainer, data, source, model_args, recipe, metrics, seconds)
        print(_summary(results, write_results(results, training_args.output_dir)))
    return 0


def build_finetune(
    model_args: ModelArguments,
    data_args: DataArguments,
    recipe: RecipeArguments,
    training_args: TrainingArguments,
) -> tuple[FinetuneTrainer, LabelledData, ModelSource]:
    """The Trainer of a fine-tuning run, its data and its model source."""
    set_seed(training_args.seed)
    source = find_model(model_args.model_name_or_path, model_args.model_revision)
    data = load_labelled_data(data_args, source.config.image_size)
    id2label = dict(enumerate(data.classes))
    model = load_classifier(source, data.num_classes, id2label, recipe.drop_path_rate)
    settings = image_settings(model, model_args.eval_crop_pct)
    if training_args.process_index == 0:
        logger.info("%s", getattr(training_args, "learning_rate_source", ""))
    mixup = create_mixup(recipe, data.num_classes)
    trainer = FinetuneTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=ClassificationCollator(train_transform(recipe, settings), mixup),
        eval_collator=_eval_collator(settings),
        recipe=recipe,
        compute_metrics=topk_metrics,
        preprocess_logits_for_metrics=topk_predictions,
    )
    trainer.image_settings = settings
    return trainer, data, source


def finetune_results(
    trainer: FinetuneTrainer,
    data: LabelledData,
    source: ModelSource,
    model_args: ModelArguments,
    recipe: RecipeArguments,
    metrics: dict[str, float],
    seconds: float,
) -> dict[str, Any]:
    """The results file of a fine-tuning run: the recipe, the schedule actually run, top-1/5."""
    args = trainer.args
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    training = {
        "learning_rate": args.learning_rate,
        "global_batch_size": global_batch_size(args),
        "epochs": args.num_train_epochs if args.max_steps <= 0 else None,
        "max_steps": args.max_steps if args.max_steps > 0 else None,
        "steps_done": trainer.state.global_step,
        "warmup_steps": args.warmup_steps,
        "lr_schedule": schedule,
        "weight_decay": args.weight_decay,
        "adam_betas": [args.adam_beta1, args.adam_beta2],
        "adam_epsilon": args.adam_epsilon,
        "max_grad_norm": args.max_grad_norm,
        "seed": args.seed,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
    }
    record = {
        **asdict(recipe),
        **{k: v for k, v in training.items() if v is not None},
        "drop_path_rate": trainer.model.config.drop_path_rate,
        **_transform_record(trainer.image_settings),
    }
    protocol = f"fine-tuning ({recipe.preset} recipe, {trainer.state.global_step} steps)"
    return build_results(
        "finetune",
        protocol,
        model_args.model_name_or_path,
        source.description,
        data.description,
        {"top1": metrics["eval_top1"], "top5": metrics["eval_top5"]},
        record,
        len(data.train),
        len(data.validation),
        seconds,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m cim_models.evaluation.cli {finetune,knn,linear} ...`` (torchrun, accelerate)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "finetune":
        return finetune_main(argv[1:])
    return eval_main(argv)


if __name__ == "__main__":
    sys.exit(main())
