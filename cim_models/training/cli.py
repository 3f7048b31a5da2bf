"""``cim-pretrain``: CIM pre-training from the command line.

Every `TrainingArguments` flag works; model and data flags are grouped below them in ``--help``.
``--preset`` picks a configuration (``tiny`` by default: a CPU run of minutes on built-in data).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ..configuration_cim import CIMConfig
from ..masking import BlockMaskingGenerator
from ..pretraining import CIMForPreTraining
from .callbacks import ImageGridCallback
from .data import (
    ClassificationCollator,
    CIMDataCollator,
    EvalTransform,
    ImageFolderDataset,
    SeededDataset,
    SyntheticShapes,
    TwoViewTransform,
    load_hf_dataset,
)
from .presets import PRESETS
from .trainer import CIMTrainer, CIMTrainingArguments, NonFiniteLossError

logger = logging.getLogger("cim_models.pretrain")


@dataclass
class ModelArguments:
    """What to pre-train (defaults marked None come from the preset, then from CIMConfig)."""

    preset: str = field(default="tiny", metadata={"help": f"One of {sorted(PRESETS)}.", "choices": sorted(PRESETS)})
    objective: str | None = field(default=None, metadata={"help": "respix or revdet.", "choices": ["respix", "revdet"]})
    enhancer: str | None = field(default=None, metadata={"help": "timm name of the enhancer (any timm backbone)."})
    enhancer_kwargs: str | None = field(default=None, metadata={"help": 'JSON of extra timm kwargs, e.g. \'{"depth": 6}\'.'})
    image_size: int | None = field(default=None, metadata={"help": "Input size of enhancer and generator."})
    patch_size: int | None = field(default=None, metadata={"help": "Stride of the visual-token grid."})
    num_mask_patches: int | None = field(default=None, metadata={"help": "Masked patches per image."})
    generator_hidden_size: int | None = field(default=None, metadata={"help": "Generator width."})
    generator_num_hidden_layers: int | None = field(default=None, metadata={"help": "Generator depth."})
    tokenizer: str | None = field(default=None, metadata={"help": "dall-e or palette.", "choices": ["dall-e", "palette"]})
    tokenizer_weights: str | None = field(
        default=None, metadata={"help": "Folder or Hub repo with the converted DALL-E weights (convert_dall_e.py)."}
    )
    sampling_temperature: float | None = field(default=None, metadata={"help": "Temperature of the generator's samples."})
    window_size: int | None = field(default=None, metadata={"help": "ResPix sliding-window size."})
    enhancer_loss_weight: float | None = field(default=None, metadata={"help": "lambda in L_gen + lambda * L_enh."})
    drop_path_rate: float | None = field(default=None, metadata={"help": "Enhancer stochastic depth."})


@dataclass
class DataArguments:
    """Where the images come from: a folder, a Hugging Face dataset, or the built-in synthetic shapes."""

    train_dir: str | None = field(default=None, metadata={"help": "Image folder (recursive; class sub-folders = labels)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Labelled image folder for the kNN monitor."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hugging Face dataset name or path (needs `datasets`)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split to pre-train on."})
    validation_split: str | None = field(default=None, metadata={"help": "Split for the kNN monitor."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (default: image/img)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (default: label/labels)."})
    synthetic_train_samples: int = field(default=3000, metadata={"help": "Built-in data: training images."})
    synthetic_eval_samples: int = field(default=1000, metadata={"help": "Built-in data: kNN query images."})
    knn_bank_samples: int = field(default=5000, metadata={"help": "Training images in the kNN monitor's bank."})
    min_crop_scale: float = field(default=0.08, metadata={"help": "Smallest RandomResizedCrop area fraction."})
    strict_data: bool = field(default=False, metadata={"help": "Stop at an unreadable image instead of skipping it."})


def _explicit_preset(argv: list[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny")
    return pre.parse_known_args(argv)[0].preset


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, CIMTrainingArguments]:
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ModelArguments, DataArguments, CIMTrainingArguments))
    preset = _explicit_preset(argv)
    if preset not in PRESETS:
        parser.error(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    # The preset changes defaults, so every explicit flag still wins.
    parser.set_defaults(output_dir=f"cim-pretrain-{preset}", remove_unused_columns=False, report_to="none",
                        **PRESETS[preset])
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.resume_from_checkpoint == "last":
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            parser.error(f"--resume_from_checkpoint last: no checkpoint-* folder in {training_args.output_dir}")
        training_args.resume_from_checkpoint = last
    return model_args, data_args, training_args


def build_config(model_args: ModelArguments) -> CIMConfig:
    values = {k: v for k, v in asdict(model_args).items() if v is not None and k != "preset"}
    if "enhancer_kwargs" in values:
        try:
            values["enhancer_kwargs"] = json.loads(values["enhancer_kwargs"])
        except json.JSONDecodeError as err:
            raise ValueError(f"--enhancer_kwargs must be JSON, got {model_args.enhancer_kwargs!r}: {err}") from err
    if values.get("tokenizer", "dall-e") == "dall-e" and not values.get("tokenizer_weights"):
        raise SystemExit(
            "cim-pretrain: the DALL-E tokenizer needs weights. Convert OpenAI's files once with\n"
            "  python conversion/convert_dall_e.py --encoder encoder.pkl --decoder decoder.pkl --out dall-e/\n"
            "and pass --tokenizer_weights dall-e/ (or a Hub repo id holding the converted files),\n"
            "or use the weightless stand-in: --tokenizer palette."
        )
    return CIMConfig(**values)


def load_datasets(data_args: DataArguments, image_size: int, seed: int):
    """(train, labelled evaluation or None, kNN bank or None) as datasets of {"image", ["label"]}."""
    if data_args.train_dir:
        train = ImageFolderDataset(data_args.train_dir, strict=data_args.strict_data)
        evaluation = ImageFolderDataset(data_args.validation_dir, strict=data_args.strict_data) if data_args.validation_dir else None
    elif data_args.dataset_name:
        hf = dict(config_name=data_args.dataset_config_name, image_column=data_args.image_column_name,
                  label_column=data_args.label_column_name)
        train = load_hf_dataset(data_args.dataset_name, split=data_args.train_split, **hf)
        evaluation = (load_hf_dataset(data_args.dataset_name, split=data_args.validation_split, **hf)
                      if data_args.validation_split else None)
    else:
        train = SyntheticShapes(data_args.synthetic_train_samples, image_size=image_size, seed=seed)
        evaluation = SyntheticShapes(data_args.synthetic_eval_samples, image_size=image_size, seed=seed + 1)
    bank = None
    if evaluation is not None and _is_labelled(train) and _is_labelled(evaluation):
        bank = torch.utils.data.Subset(train, range(min(len(train), data_args.knn_bank_samples)))
    return train, evaluation, bank


def _is_labelled(dataset) -> bool:
    return len(dataset) > 0 and "label" in dataset[0]


def build_trainer(model_args: ModelArguments, data_args: DataArguments, training_args: CIMTrainingArguments):
    """The model, data and CIMTrainer a run needs; returns ``(trainer, image_grid_callback or None)``."""
    set_seed(training_args.seed)
    config = build_config(model_args)
    model = CIMForPreTraining(config)
    train, evaluation, bank = load_datasets(data_args, config.image_size, training_args.seed)

    resolved = {"preset": model_args.preset, "model": config.to_dict(), "data": asdict(data_args),
                "training": training_args.to_dict()}
    logger.info("Resolved configuration:\n%s", json.dumps(resolved, indent=2, default=str))
    if training_args.process_index == 0:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "cim_pretrain_config.json"), "w") as f:
            json.dump(resolved, f, indent=2, default=str)

    masking = BlockMaskingGenerator(config.grid_size, config.num_mask_patches, config.min_mask_patches_per_block)
    two_views = TwoViewTransform(config.image_size, model.tokenizer_image_size, config.image_mean, config.image_std,
                                 scale=(data_args.min_crop_scale, 1.0))
    collator = CIMDataCollator(two_views, masking)
    knn_collator = ClassificationCollator(EvalTransform(config.image_size, config.image_mean, config.image_std))
    if training_args.eval_strategy != "no" and evaluation is None:
        training_args.eval_strategy = "no"  # nothing to evaluate on: a plain run, no kNN monitor
    trainer = CIMTrainer(
        model=model,
        args=training_args,
        train_dataset=SeededDataset(train),
        eval_dataset=evaluation,
        data_collator=collator,
        knn_bank_dataset=bank,
        knn_eval_dataset=evaluation if bank is not None else None,
        knn_collator=knn_collator,
    )
    grids = None
    if training_args.image_log_steps > 0:
        with torch.random.fork_rng():  # a fixed batch that leaves the run's RNG untouched
            torch.manual_seed(training_args.seed)
            examples = [train[i] for i in range(min(training_args.num_grid_images, len(train)))]
            batch = {k: v for k, v in collator(examples).items() if k != "labels"}
        grids = ImageGridCallback(batch, training_args.image_log_steps, training_args.output_dir)
        trainer.add_callback(grids)
    return trainer, grids


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_args(argv)
    if training_args.use_cpu or not torch.cuda.is_available():
        # AdamW's second moments underflow into denormal floats, which x86 CPUs handle ~50x slower.
        torch.set_flush_denormal(True)
    trainer, grids = build_trainer(model_args, data_args, training_args)
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except NonFiniteLossError as err:
        logger.error("%s", err)
        return 1
    trainer.save_model()
    trainer.save_state()
    final = trainer.evaluate() if trainer.eval_dataset is not None else {}
    if trainer.is_world_process_zero():
        _print_summary(trainer, result, final, grids, time.perf_counter() - started)
    return 0


def _print_summary(trainer: CIMTrainer, result, final: dict, grids, seconds: float) -> None:
    history = [entry for entry in trainer.state.log_history if "generator_loss" in entry]
    last = history[-1] if history else {}
    lines = [
        "",
        "CIM pre-training finished",
        f"  steps: {trainer.state.global_step} in {seconds / 60:.1f} min; final training loss {result.training_loss:.4f}",
    ]
    for name in ("generator_loss", "generator_accuracy", "enhancer_loss", "replaced_fraction", "revdet_accuracy"):
        if name in last:
            lines.append(f"  {name} (last logging window): {last[name]:.4f}")
    if "eval_knn_top1" in final:
        baseline = trainer.knn_baseline
        lines.append(
            f"  kNN top-1 (k={trainer.args.knn_k}): {final['eval_knn_top1']:.4f}"
            + (f" vs {baseline:.4f} untrained" if baseline is not None else "")
        )
    skipped = getattr(trainer.train_dataset, "skipped_files", None)
    if skipped:
        lines.append(f"  unreadable images skipped ({len(skipped)}): " + ", ".join(map(str, sorted(skipped))))
    if trainer.nonfinite_steps:
        lines.append(f"  updates skipped for NaN/inf losses: {trainer.nonfinite_steps}")
    lines.append(f"  model: {trainer.args.output_dir} (export with conversion/export_checkpoint.py)")
    if grids is not None and grids.last_path:
        lines.append(f"  image grids: {os.path.dirname(grids.last_path)}")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
