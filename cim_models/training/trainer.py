"""CIMTrainer: the transformers Trainer, plus what a CIM pre-training loop needs and nothing of
the method.

The method lives in ``CIMForPreTraining.forward``. This class owns the optimizer groups, metric
logging across processes, the kNN monitor, the randomness of each step and of the data order, and
the handling of non-finite losses. Distribution (torchrun, accelerate, DeepSpeed, FSDP) comes from
the Trainer unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback

from ..data import SeededDataset, SeededRandomSampler, argument, derive_seed
from ..evaluation.features import extract_features
from ..evaluation.knn import knn_accuracy
from .arguments import RunArguments, find_last_checkpoint

logger = logging.getLogger(__name__)

LOGGED_METRICS = (
    "generator_loss",
    "generator_accuracy",
    "enhancer_loss",
    "replaced_fraction",
    "revdet_accuracy",
)


class NonFiniteLossError(RuntimeError):
    """Raised after too many optimizer steps in a row were skipped for a NaN or infinite loss."""


@dataclass
class CIMTrainingArguments(RunArguments):
    """`TrainingArguments` plus the CIM recipe's own knobs."""

    base_learning_rate: float | None = argument(
        None,
        "Learning rate per 256 images: learning_rate = base_learning_rate x global batch / 256 "
        "(the BEiT/MAE convention; the paper: 1.5e-3 at 2048, i.e. 1.875e-4). Presets set it; an "
        "explicit --learning_rate wins.",
    )
    generator_lr_scale: float = argument(
        1.0, "The generator's learning rate relative to the enhancer's."
    )
    image_log_steps: int = argument(0, "Save an image grid every N steps (0: never).")
    num_grid_images: int = argument(8, "Images in each image grid.")
    max_nonfinite_steps: int = argument(
        10, "Stop after this many optimizer steps in a row were skipped for a NaN/inf loss."
    )
    knn_k: int = argument(20, "Neighbours of the kNN monitor.")
    knn_temperature: float = argument(0.07, "Vote temperature of the kNN monitor.")


class CIMTrainer(Trainer):
    """Trains :class:`~cim_models.CIMForPreTraining`.

    Args (besides the Trainer's):
        knn_bank_dataset, knn_eval_dataset: labelled datasets of eval-transformed images for the kNN
            monitor (``knn_collator`` batches them); when both are given, every evaluation logs
            ``eval_knn_top1`` and training logs the untrained baseline at step 0.
    """

    # The model's loss is a per-batch mean, so the Trainer must divide it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args,
        knn_bank_dataset: Dataset | None = None,
        knn_eval_dataset: Dataset | None = None,
        knn_collator=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.knn_bank_dataset = knn_bank_dataset
        self.knn_eval_dataset = knn_eval_dataset
        self.knn_collator = knn_collator
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_steps = 0
        self._eval_sums: dict[str, torch.Tensor] = {}
        self._eval_steps = 0
        self._nonfinite_in_window = False
        self._nonfinite_in_a_row = 0
        self.nonfinite_steps = 0
        self.knn_baseline: float | None = None
        self.seeded_sampler: SeededRandomSampler | None = None
        self._micro_step = 0
        self.add_callback(_SamplerEpochCallback(self))
        if knn_bank_dataset is not None and knn_eval_dataset is not None:
            self.add_callback(_KNNBaselineCallback(self))

    # ---------------------------------------------------------------------------------- optimizer

    def create_optimizer(self, model=None):
        """AdamW groups: enhancer (with its head) first, so the logged learning rate is the
        enhancer's, then the generator at ``generator_lr_scale``; each split into decay and
        no-decay. No decay on 1-D parameters (norms, biases, layer scales) and on the backbones'
        ``no_weight_decay()`` names (position embeddings, class and mask tokens, relative position
        tables). The frozen tokenizer is in no group."""
        if self.optimizer is not None:
            return self.optimizer
        model = model or self.model
        no_decay = set()
        for prefix in ("enhancer", "generator"):
            submodule = getattr(model, prefix)
            if hasattr(submodule, "no_weight_decay"):
                no_decay |= {f"{prefix}.{name}" for name in submodule.no_weight_decay()}
        lr, weight_decay = self.args.learning_rate, self.args.weight_decay
        groups = {
            (part, decay): {
                "params": [],
                "lr": lr * (self.args.generator_lr_scale if part == "generator" else 1.0),
                "weight_decay": weight_decay if decay else 0.0,
            }
            for part in ("enhancer", "generator")
            for decay in (True, False)
        }
        for name, param in model.named_parameters():
            if not param.requires_grad or name.startswith("tokenizer."):
                continue
            part = "generator" if name.startswith("generator.") else "enhancer"
            decay = param.ndim > 1 and name not in no_decay
            groups[(part, decay)]["params"].append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(
            [g for g in groups.values() if g["params"]], **optimizer_kwargs
        )
        return self.optimizer

    # ---------------------------------------------------------------------------------- the step

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "labels"}  # labels: kNN monitor only
        outputs = model(**inputs)
        # Summed on the device, read once per logging window or evaluation: the step never waits
        # on the host.
        sums = self._metric_sums if model.training else self._eval_sums
        for name in LOGGED_METRICS:
            value = getattr(outputs, name)
            if value is not None:
                sums[name] = sums.get(name, 0) + value.detach().float()
        if model.training:
            self._metric_steps += 1
        else:
            self._eval_steps += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The generator's token sampling and drop path draw from the global RNG. Seeding it from
        # (seed, process, step, micro-batch) gives every process its own draws, and a resumed run
        # exactly the draws of the uninterrupted one, whatever ran in between (evaluation, grids).
        torch.manual_seed(
            derive_seed(
                self.args.seed, self.args.process_index, self.state.global_step, self._micro_step
            )
        )
        self._micro_step += 1
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss)
        if self.args.world_size > 1:  # every rank must skip the same update
            finite = (
                self.accelerator.reduce(finite.float(), reduction="sum") == self.args.world_size
            )
        if not bool(finite):
            self._nonfinite_in_window = True
        if self.accelerator.sync_gradients:  # the last micro-batch before the optimizer step
            self._micro_step = 0
            if self._nonfinite_in_window:
                self._skip_update(loss)
            else:
                self._nonfinite_in_a_row = 0
            self._nonfinite_in_window = False
        return loss

    def _skip_update(self, loss: torch.Tensor) -> None:
        # AdamW leaves parameters whose grad is None untouched (no moment update, no weight decay),
        # so dropping the gradients skips this update exactly.
        for param in self.model.parameters():
            param.grad = None
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        step = self.state.global_step + 1
        logger.warning(
            "Step %d: loss is %s; update skipped (%d in a row).",
            step,
            loss.item(),
            self._nonfinite_in_a_row,
        )
        if self._nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            last = self._last_checkpoint()
            raise NonFiniteLossError(
                f"Stopped at step {step}: the loss was NaN or infinite for "
                f"{self._nonfinite_in_a_row} optimizer steps in a row (max_nonfinite_steps="
                f"{self.args.max_nonfinite_steps}); the weights were not updated by those steps. "
                f"Last good checkpoint: {last or 'none saved yet'}. Try a lower learning rate, "
                "--bf16 instead of --fp16, gradient clipping (--max_grad_norm), or check the data; "
                "resume with --resume_from_checkpoint last."
            )

    def _last_checkpoint(self) -> str | None:
        return find_last_checkpoint(self.args.output_dir) if self.args.output_dir else None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation reports the CIM losses only: there are no logits a metric could consume.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---------------------------------------------------------------------------------- data

    def _get_train_sampler(self, train_dataset=None):
        # Per-sample seeds make a step's crops, flips and masks depend on (seed, epoch, index) only.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, SeededDataset):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self.seeded_sampler = SeededRandomSampler(len(dataset), seed=seed)
            return self.seeded_sampler
        return super()._get_train_sampler(train_dataset)

    # ---------------------------------------------------------------------------------- logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metric_steps:  # a training log: add the window's averages
            means = self._means(self._metric_sums, self._metric_steps)
            logs.update({name: round(value, 4) for name, value in means.items()})
            logs["nonfinite_steps"] = self.nonfinite_steps
            self._metric_sums, self._metric_steps = {}, 0
        super().log(logs, start_time)

    def _means(self, sums: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
        """Per-step means of summed metrics, averaged over the processes (one host sync)."""
        names = sorted(sums)
        means = torch.stack([sums[n] for n in names]) / steps
        means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
        return dict(zip(names, means.tolist()))

    # ---------------------------------------------------------------------------------- kNN monitor

    def knn_top1(self) -> float | None:
        """The enhancer's kNN top-1 accuracy on the monitor datasets (None without them).

        Every process embeds its share of the images and the features are gathered, so every
        process joins every forward (FSDP and DeepSpeed ZeRO-3 need that) and all get the result.
        """
        if self.knn_bank_dataset is None or self.knn_eval_dataset is None:
            return None
        enhancer = self.accelerator.unwrap_model(self.model).enhancer
        # Monitoring must not consume the training RNG.
        devices = [self.args.device] if self.args.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self._full_parameters():
            bank, bank_labels = self._gathered_features(enhancer, self.knn_bank_dataset)
            queries, query_labels = self._gathered_features(enhancer, self.knn_eval_dataset)
        accuracy = knn_accuracy(
            bank, bank_labels, queries, query_labels, self.args.knn_k, self.args.knn_temperature
        )
        return accuracy[1]

    def _gathered_features(self, enhancer, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, D) and labels (N,) of ``dataset``, each process embedding a strided share
        padded to the same length (padding carries label -1 and is dropped after gathering)."""
        share = _PaddedShare(dataset, self.args.process_index, self.args.world_size)
        loader = DataLoader(
            share,
            batch_size=self.args.per_device_eval_batch_size,
            collate_fn=self.knn_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        with torch.autocast(self.args.device.type, enabled=False):
            features, labels = extract_features(enhancer, loader, self.args.device, normalize=True)
        if self.args.world_size > 1:
            features = self.accelerator.gather(features.to(self.args.device)).cpu()
            labels = self.accelerator.gather(labels.to(self.args.device)).cpu()
        keep = labels >= 0
        return features[keep], labels[keep]

    @contextmanager
    def _full_parameters(self) -> Iterator[None]:
        """Lets a submodule (the enhancer) run outside the model's own forward.

        FSDP2 gathers a sub-unit's parameters in that unit's forward, but the parameters the root
        unit holds only in the root's forward: unshard them around the call. DDP, DeepSpeed and a
        single process need nothing (ZeRO-3 gathers in hooks on every submodule).
        """
        root = self.model
        if self.is_fsdp_enabled and hasattr(root, "unshard") and hasattr(root, "reshard"):
            root.unshard()
            try:
                yield
            finally:
                root.reshard()
        else:
            yield

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The Trainer's evaluation (CIM losses), plus the means of the step's metrics
        (``eval_generator_accuracy``, ...) and the kNN monitor's ``eval_knn_top1``."""
        metrics, extra = {}, {}
        if eval_dataset is not None or self.eval_dataset is not None:
            devices = [self.args.device] if self.args.device.type == "cuda" else []
            self._eval_sums, self._eval_steps = {}, 0
            with torch.random.fork_rng(devices=devices):
                metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            if self._eval_steps:
                means = self._means(self._eval_sums, self._eval_steps)
                extra = {f"{metric_key_prefix}_{name}": value for name, value in means.items()}
        accuracy = self.knn_top1()
        if accuracy is not None:
            extra[f"{metric_key_prefix}_knn_top1"] = accuracy
        if extra:
            metrics.update(extra)
            self.log(extra)
        return metrics

    @torch.no_grad()
    def majority_token_rate(self, dataset: Dataset, max_images: int = 512) -> float:
        """How often the most common token fills a masked position, over up to ``max_images``
        images of ``dataset`` (seeded views): the accuracy of always guessing one token, the
        chance level a generator must beat besides ``1 / vocab_size``. Every process joins."""
        model = self.accelerator.unwrap_model(self.model)
        count = min(max_images, len(dataset))
        items = [{**dataset[i], "seed": i} for i in range(count)]
        counts = torch.zeros(model.config.vocab_size, dtype=torch.long)
        with self._full_parameters():
            for start in range(0, count, self.args.per_device_eval_batch_size):
                batch = self.data_collator(
                    items[start : start + self.args.per_device_eval_batch_size]
                )
                ids = model.tokenize(batch["tokenizer_pixel_values"].to(self.args.device))
                masked = ids.flatten(1)[batch["bool_masked_pos"].flatten(1).to(ids.device)]
                counts += torch.bincount(masked.cpu(), minlength=counts.numel())
        return counts.max().item() / max(counts.sum().item(), 1)

    def log_knn_baseline(self) -> None:
        """Log the untrained enhancer's kNN accuracy at step 0 (kept as ``knn_baseline``)."""
        baseline = self.knn_top1()
        if baseline is None:
            return
        self.knn_baseline = baseline
        self.log({"eval_knn_top1": baseline})


class _KNNBaselineCallback(TrainerCallback):
    def __init__(self, trainer: CIMTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # not on resume: the baseline is the untrained enhancer's
            self.trainer.log_knn_baseline()


class _SamplerEpochCallback(TrainerCallback):
    """Sets the seeded sampler's epoch from the Trainer's state before every epoch.

    The epoch is the number of whole epochs the global step has passed, so a run resumed in the
    middle of epoch ``e`` shuffles epoch ``e`` (and every later one) as the uninterrupted run did,
    on any number of processes, whichever version of accelerate wraps the loader.
    """

    def __init__(self, trainer: CIMTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        sampler = getattr(self.trainer, "seeded_sampler", None)
        if sampler is None or train_dataloader is None:
            return
        batches = len(train_dataloader)
        accumulation = args.gradient_accumulation_steps
        steps_per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
        sampler.set_epoch(state.global_step // steps_per_epoch)


class _PaddedShare(Dataset):
    """Items ``rank, rank + world, ...`` of ``dataset``, padded with label -1 items so that every
    process holds ``ceil(len / world)`` items (and runs the same number of batches)."""

    def __init__(self, dataset: Dataset, rank: int, world: int):
        self.dataset = dataset
        self.indices = list(range(rank, len(dataset), world))
        self.length = math.ceil(len(dataset) / world)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int) -> dict:
        if position < len(self.indices):
            return self.dataset[self.indices[position]]
        return {**self.dataset[0], "label": -1}
