"""``cim-pretrain``: CIM pre-training from the command line.

Every `TrainingArguments` flag works; model and data flags are grouped below them in ``--help``.
``--preset`` picks a configuration; without one the run is ``tiny`` (a CPU run of minutes on the
built-in data), and the user's own data needs a preset named explicitly.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

from ..configuration_cim import CIMConfig
from ..data import (
    CIMDataCollator,
    ClassificationCollator,
    SeededDataset,
    TwoViewTransform,
    argument,
    create_eval_transform,
    derive_seed,
    load_split,
)
from ..data import DataArguments as _DataArguments
from ..masking import BlockMaskingGenerator
from ..pretraining import CIMForPreTraining
from .arguments import (
    explicit_flags,
    find_last_checkpoint,
    parse_known,
    prepare_output_dir,
    quiet_replicas,
    resolve_learning_rate,
    use_fast_cpu_math,
)
from .callbacks import ImageGridCallback
from .presets import DEFAULT_PRESET, PRESET_DESCRIPTIONS, PRESETS
from .trainer import CIMTrainer, CIMTrainingArguments, NonFiniteLossError

logger = logging.getLogger("cim_models.pretrain")

TOKENIZERS = ["dall-e", "palette", "codebook"]


@dataclass
class ModelArguments:
    """What to pre-train (defaults marked None come from the preset, then from CIMConfig)."""

    preset: str | None = argument(
        None,
        f"One of {sorted(PRESETS)} (default: {DEFAULT_PRESET} on the built-in data; your own "
        "data needs one named).",
        choices=sorted(PRESETS),
    )
    model_name_or_path: str | None = argument(
        None,
        "Start from weights: a cim-pretrain run or checkpoint folder continues pre-training "
        "(generator and enhancer); a timm name or Hub id with pretrained weights (e.g. "
        "timm/vit_small_patch16_224.augreg_in1k) starts the enhancer from them.",
    )
    objective: str | None = argument(None, "respix or revdet.", choices=["respix", "revdet"])
    enhancer: str | None = argument(None, "timm name of the enhancer (any timm backbone).")
    enhancer_kwargs: str | None = argument(
        None, "JSON of extra timm kwargs, e.g. '{\"depth\": 6}'."
    )
    image_size: int | None = argument(None, "Input size of enhancer and generator.")
    patch_size: int | None = argument(None, "Stride of the visual-token grid.")
    num_mask_patches: int | None = argument(None, "Masked patches per image.")
    generator_hidden_size: int | None = argument(None, "Generator width.")
    generator_num_hidden_layers: int | None = argument(None, "Generator depth.")
    tokenizer: str | None = argument(None, " or ".join(TOKENIZERS) + ".", choices=TOKENIZERS)
    tokenizer_weights: str | None = argument(
        None, "Folder or Hub repo with the tokenizer's weights (cim-convert-dall-e writes them)."
    )
    tokenizer_fit_samples: int = argument(
        4096, "Codebook tokenizer: training images it is fitted on before pre-training."
    )
    sampling_temperature: float | None = argument(None, "Temperature of the generator's samples.")
    window_size: int | None = argument(None, "ResPix sliding-window size.")
    enhancer_loss_weight: float | None = argument(None, "lambda in L_gen + lambda * L_enh.")
    drop_path_rate: float | None = argument(None, "Enhancer stochastic depth.")


# Flags of ModelArguments that are not CIMConfig fields.
_NOT_CONFIG = {"preset", "model_name_or_path", "tokenizer_fit_samples"}


@dataclass
class DataArguments(_DataArguments):
    """Where the images come from: a folder, a Hugging Face dataset, or the built-in synthetic
    shapes; a labelled validation set turns on the kNN monitor."""

    validation_split: str | None = argument(None, "Split for the kNN monitor.")
    knn_bank_samples: int = argument(5000, "Training images in the kNN monitor's bank.")
    min_crop_scale: float = argument(0.08, "Smallest RandomResizedCrop area fraction.")


def _refuse_user_data_without_preset(parser: HfArgumentParser, argv: list[str]) -> None:
    given = parse_known(argv, train_dir=None, validation_dir=None, dataset_name=None, preset=None)
    if given.preset is None and (given.train_dir or given.validation_dir or given.dataset_name):
        presets = "\n".join(f"  {name:10s} {PRESET_DESCRIPTIONS[name]}" for name in PRESETS)
        parser.error(
            "your own images need a preset that fits them; pass --preset with one of\n"
            f"{presets}\n(the default, {DEFAULT_PRESET}, is meant for the built-in data only)."
        )


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, CIMTrainingArguments]:
    """The three argument groups, with the preset's defaults, the learning rate and the
    checkpoint to resume from resolved."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, CIMTrainingArguments))
    _refuse_user_data_without_preset(parser, argv)
    preset = parse_known(argv, preset=None).preset or DEFAULT_PRESET
    if preset not in PRESETS:
        parser.error(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    # The preset changes defaults, so every explicit flag still wins.
    parser.set_defaults(
        output_dir=f"cim-pretrain-{preset}",
        remove_unused_columns=False,
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning only speeds copies to a GPU
        **PRESETS[preset],
    )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    model_args.preset = preset
    try:
        training_args.learning_rate_source = resolve_learning_rate(
            training_args, training_args.base_learning_rate, explicit_flags(argv)
        )
        prepare_output_dir(training_args, training_args.overwrite_output_dir)
    except ValueError as err:
        parser.error(str(err))
    return model_args, data_args, training_args


def build_config(model_args: ModelArguments) -> CIMConfig:
    values = {k: v for k, v in asdict(model_args).items() if v is not None and k not in _NOT_CONFIG}
    if "enhancer_kwargs" in values:
        try:
            values["enhancer_kwargs"] = json.loads(values["enhancer_kwargs"])
        except json.JSONDecodeError as err:
            raise ValueError(
                f"--enhancer_kwargs must be JSON, got {model_args.enhancer_kwargs!r}: {err}"
            ) from err
    if values.get("tokenizer", "dall-e") == "dall-e" and not values.get("tokenizer_weights"):
        raise SystemExit(
            "cim-pretrain: the DALL-E tokenizer needs weights. Convert OpenAI's files once with\n"
            "  cim-convert-dall-e --encoder encoder.pkl --decoder decoder.pkl --out dall-e/\n"
            "and pass --tokenizer_weights dall-e/ (or a Hub repo id holding the converted files),\n"
            "or use a weightless tokenizer: --tokenizer palette (or codebook)."
        )
    return CIMConfig(**values)


def build_model(model_args: ModelArguments) -> CIMForPreTraining:
    """A new model from the flags, or one that starts from ``--model_name_or_path``: a CIM folder
    (run, checkpoint or export) continues as saved; anything else names timm weights for the
    enhancer (a timm model name with a pretrained tag, ``hf-hub:org/name``, ``timm/...``)."""
    source = model_args.model_name_or_path
    if source is not None and os.path.isdir(source):
        folder = source
        if not os.path.isfile(os.path.join(folder, "config.json")):
            folder = find_last_checkpoint(source) or source
        model = CIMForPreTraining.from_pretrained(folder)
        logger.info("Continuing pre-training from %s (its config; model flags are ignored)", folder)
        return model
    model = CIMForPreTraining(build_config(model_args))
    if source is not None:
        load_enhancer_weights(model, source)
    return model


def load_enhancer_weights(model: CIMForPreTraining, name: str) -> None:
    """Copy timm's pretrained weights ``name`` into the enhancer (same architecture and sizes)."""
    import timm

    try:
        weights = timm.create_model(name, pretrained=True, num_classes=0).state_dict()
    except Exception as err:
        raise ValueError(
            f"--model_name_or_path {name!r} is not a folder and timm could not load pretrained "
            f"weights for it ({type(err).__name__}: {err}); pass a cim-pretrain run or "
            "checkpoint folder, or timm weights such as timm/vit_small_patch16_224.augreg_in1k."
        ) from err
    try:
        missing, unexpected = model.enhancer.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(
            f"The weights of {name!r} do not fit the enhancer {model.config.enhancer!r}: {err}. "
            "Pick the same architecture with --enhancer/--enhancer_kwargs (or a preset with it)."
        ) from err
    if missing:
        logger.warning("Enhancer parameters not in %s (left as initialised): %s", name, missing)
    if unexpected:
        logger.warning(
            "Weights of %s the enhancer has no place for (ignored): %s", name, unexpected
        )
    logger.info("Enhancer initialised from %s", name)


def fit_tokenizer(
    model: CIMForPreTraining,
    train,
    collator: CIMDataCollator,
    num_images: int,
    args: CIMTrainingArguments,
) -> None:
    """Fit a data-fitted tokenizer (the codebook) that is not fitted yet on the tokenizer views
    ``collator`` makes of ``num_images`` training images. Every process fits the same codebook:
    same images, same seed."""
    tokenizer = model.tokenizer
    if not hasattr(tokenizer, "fit") or bool(getattr(tokenizer, "fitted", True)):
        return
    count = min(num_images, len(train))
    progress = args.process_index == 0 and not args.disable_tqdm
    views = []
    for start in tqdm(range(0, count, 256), desc="Tokenizer views", disable=not progress):
        items = [
            {**train[i], "seed": derive_seed(args.seed, i, 0, 0)}  # 4 keys: not a sample seed
            for i in range(start, min(start + 256, count))
        ]
        views.append(collator(items)["tokenizer_pixel_values"])  # (b, 3, T, T) in [0, 1]
    tokenizer.fit(torch.cat(views), seed=args.seed, progress=progress)


def load_datasets(data_args: DataArguments, image_size: int):
    """(train, labelled evaluation or None, kNN bank or None): datasets of {"image", ["label"]}."""
    train = load_split(data_args, "train", image_size)
    evaluation = load_split(data_args, "validation", image_size)
    bank = None
    if evaluation is not None and _is_labelled(train) and _is_labelled(evaluation):
        bank = torch.utils.data.Subset(train, range(min(len(train), data_args.knn_bank_samples)))
    return train, evaluation, bank


def _is_labelled(dataset) -> bool:
    return len(dataset) > 0 and "label" in dataset[0]


def build_trainer(
    model_args: ModelArguments, data_args: DataArguments, training_args: CIMTrainingArguments
):
    """The model, data and CIMTrainer a run needs; returns ``(trainer, image_grid_callback or
    None)``."""
    set_seed(training_args.seed)
    model = build_model(model_args)
    config = model.config
    train, evaluation, bank = load_datasets(data_args, config.image_size)

    main_process = training_args.process_index == 0
    resolved = {
        "preset": model_args.preset,
        "model": config.to_dict(),
        "data": asdict(data_args),
        "training": training_args.to_dict(),
    }
    if main_process:
        logger.info("Resolved configuration:\n%s", json.dumps(resolved, indent=2, default=str))
        logger.info("%s", getattr(training_args, "learning_rate_source", ""))
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "cim_pretrain_config.json"), "w") as f:
            json.dump(resolved, f, indent=2, default=str)

    masking = BlockMaskingGenerator(
        config.grid_size, config.num_mask_patches, config.min_mask_patches_per_block
    )
    two_views = TwoViewTransform(
        config.image_size,
        model.tokenizer_image_size,
        config.image_mean,
        config.image_std,
        scale=(data_args.min_crop_scale, 1.0),
    )
    collator = CIMDataCollator(two_views, masking)
    if not training_args.resume_from_checkpoint:  # a checkpoint holds the fitted tokenizer
        # The codebook describes whole images: crops down to 8% of the area are upsampled, blurry
        # views, and fitting on them gave ResPix weaker features on real images (benchmarks/).
        whole_images = TwoViewTransform(
            config.image_size,
            model.tokenizer_image_size,
            config.image_mean,
            config.image_std,
            scale=(1.0, 1.0),
            ratio=(1.0, 1.0),
            hflip=0.0,
        )
        fit_collator = CIMDataCollator(whole_images, masking)
        fit_tokenizer(model, train, fit_collator, model_args.tokenizer_fit_samples, training_args)
    knn_collator = ClassificationCollator(
        create_eval_transform(config.image_size, config.image_mean, config.image_std)
    )
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
        grids = ImageGridCallback(
            batch, training_args.image_log_steps, training_args.output_dir, trainer.callback_handler
        )
        trainer.add_callback(grids)
    return trainer, grids


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
    )
    model_args, data_args, training_args = parse_args(argv)
    quiet_replicas(training_args)
    use_fast_cpu_math(training_args)
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
    held_out = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
    majority = trainer.majority_token_rate(held_out)  # every process joins its forwards
    if trainer.is_world_process_zero():
        seconds = time.perf_counter() - started
        _print_summary(trainer, result, final, majority, grids, seconds)
    return 0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _did_it_help(trainer: CIMTrainer, final: dict, last: dict, majority: float) -> list[str]:
    """Whether pre-training helped: the enhancer's kNN top-1 on the held-out split, trained vs
    untrained, and the generator's masked-token accuracy against chance."""
    lines = []
    trained, untrained = final.get("eval_knn_top1"), trainer.knn_baseline
    if trained is not None and untrained is not None:
        verdict = "better" if trained > untrained else "NOT better"
        lines.append(
            f"  kNN top-1 (k={trainer.args.knn_k}, pooled feature, held-out split): "
            f"{trained:.4f} trained vs {untrained:.4f} untrained: the enhancer's features are "
            f"{verdict} after pre-training"
        )
    elif trained is not None:
        lines.append(f"  kNN top-1 (k={trainer.args.knn_k}): {trained:.4f}")
    where = "held-out split" if "eval_generator_accuracy" in final else "last training window"
    accuracy = final.get("eval_generator_accuracy", last.get("generator_accuracy"))
    if accuracy is not None:
        vocab = trainer.accelerator.unwrap_model(trainer.model).config.vocab_size
        chance = max(1 / vocab, majority)
        verdict = "beats" if accuracy > chance else "does NOT beat"
        lines.append(
            f"  generator masked-token accuracy ({where}): {accuracy:.4f}; chance 1/{vocab} = "
            f"{1 / vocab:.4f}, the most common token {majority:.4f}: the generator {verdict} "
            "chance"
        )
    return lines


def _print_summary(
    trainer: CIMTrainer, result, final: dict, majority: float, grids, seconds: float
) -> None:
    history = [entry for entry in trainer.state.log_history if "generator_loss" in entry]
    last = history[-1] if history else {}
    lines = [
        "",
        "CIM pre-training finished",
        (
            f"  steps: {trainer.state.global_step} in {_duration(seconds)}; final training loss "
            f"{result.training_loss:.4f}; learning rate {trainer.args.learning_rate:g}"
        ),
    ]
    for name in (
        "generator_loss",
        "generator_accuracy",
        "enhancer_loss",
        "replaced_fraction",
        "revdet_accuracy",
    ):
        if name in last:
            lines.append(f"  {name} (last logging window): {last[name]:.4f}")
    lines += _did_it_help(trainer, final, last, majority)
    skipped = getattr(trainer.train_dataset, "skipped_files", None)
    if skipped:
        lines.append(
            f"  unreadable images skipped ({len(skipped)}): " + ", ".join(map(str, sorted(skipped)))
        )
    if trainer.nonfinite_steps:
        lines.append(f"  updates skipped for NaN/inf losses: {trainer.nonfinite_steps}")
    lines.append(f"  model: {trainer.args.output_dir} (export with cim-export)")
    if grids is not None and grids.last_path:
        lines.append(f"  image grids: {os.path.dirname(grids.last_path)}")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
