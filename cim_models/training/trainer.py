"""CIMTrainer: the transformers Trainer, plus what a CIM pre-training loop needs and nothing of the method.

The method lives in ``CIMForPreTraining.forward``. This class owns the optimizer groups, the learning
rate convention, metric logging across processes, the kNN monitor and the handling of non-finite losses.
Distribution (torchrun, accelerate, DeepSpeed, FSDP) comes from the Trainer unchanged.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..knn import extract_features, knn_accuracy
from .data import SeededDataset, SeededRandomSampler

logger = logging.getLogger(__name__)

KNN_BASELINE_FILE = "knn_baseline.json"
LOGGED_METRICS = ("generator_loss", "generator_accuracy", "enhancer_loss", "replaced_fraction", "revdet_accuracy")


class NonFiniteLossError(RuntimeError):
    """Raised after too many optimizer steps in a row were skipped for a NaN or infinite loss."""


@dataclass
class CIMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the CIM recipe's own knobs."""

    base_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate per 256 images; when set, learning_rate = base_learning_rate * global "
            "batch / 256 (the BEiT/MAE convention). SPEC: 1.5e-3 at 2048, i.e. 1.875e-4."
        },
    )
    generator_lr_scale: float = field(
        default=1.0, metadata={"help": "The generator's learning rate relative to the enhancer's."}
    )
    image_log_steps: int = field(
        default=0, metadata={"help": "Save an image grid every N steps (0: never)."}
    )
    num_grid_images: int = field(default=8, metadata={"help": "Images in each image grid."})
    max_nonfinite_steps: int = field(
        default=10,
        metadata={"help": "Stop after this many optimizer steps in a row were skipped for a NaN/inf loss."},
    )
    knn_k: int = field(default=20, metadata={"help": "Neighbours of the kNN monitor."})
    knn_temperature: float = field(default=0.07, metadata={"help": "Vote temperature of the kNN monitor."})


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
        if getattr(self.args, "base_learning_rate", None):
            global_batch = (
                self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            )
            self.args.learning_rate = self.args.base_learning_rate * global_batch / 256
            logger.info(
                "learning_rate = %g (base %g per 256 images x global batch %d)",
                self.args.learning_rate, self.args.base_learning_rate, global_batch,
            )
        self.knn_bank_dataset, self.knn_eval_dataset, self.knn_collator = knn_bank_dataset, knn_eval_dataset, knn_collator
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_steps = 0
        self._nonfinite_in_window = False
        self._nonfinite_in_a_row = 0
        self.nonfinite_steps = 0
        self.knn_baseline: float | None = None
        if knn_bank_dataset is not None and knn_eval_dataset is not None:
            self.add_callback(_KNNBaselineCallback(self))

    # ---------------------------------------------------------------------------------- optimizer

    def create_optimizer(self, model=None):
        """AdamW groups: enhancer (with its head) first, so the logged learning rate is the enhancer's,
        then the generator at ``generator_lr_scale``; each split into decay and no-decay. No decay on
        1-D parameters (norms, biases, layer scales) and on the backbones' ``no_weight_decay()``
        names (position embeddings, class and mask tokens, relative position tables). The frozen
        tokenizer is in no group."""
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
            (part, decay): {"params": [], "lr": lr * (self.args.generator_lr_scale if part == "generator" else 1.0),
                            "weight_decay": weight_decay if decay else 0.0}
            for part in ("enhancer", "generator") for decay in (True, False)
        }
        for name, param in model.named_parameters():
            if not param.requires_grad or name.startswith("tokenizer."):
                continue
            part = "generator" if name.startswith("generator.") else "enhancer"
            decay = param.ndim > 1 and name not in no_decay
            groups[(part, decay)]["params"].append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls([g for g in groups.values() if g["params"]], **optimizer_kwargs)
        return self.optimizer

    # ---------------------------------------------------------------------------------- the step

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "labels"}  # labels feed the kNN monitor only
        outputs = model(**inputs)
        if model.training:
            # Summed on the device; read once per logging window, so the step never waits on the host.
            for name in LOGGED_METRICS:
                value = getattr(outputs, name)
                if value is not None:
                    value = value.detach().float()
                    self._metric_sums[name] = self._metric_sums.get(name, 0) + value
            self._metric_steps += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss)
        if self.args.world_size > 1:  # every rank must skip the same update
            finite = self.accelerator.reduce(finite.float(), reduction="sum") == self.args.world_size
        if not bool(finite):
            self._nonfinite_in_window = True
        if self.accelerator.sync_gradients:  # the last micro-batch before the optimizer step
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
        logger.warning("Step %d: loss is %s; update skipped (%d in a row).", step, loss.item(), self._nonfinite_in_a_row)
        if self._nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            last = self._last_checkpoint()
            raise NonFiniteLossError(
                f"Stopped at step {step}: the loss was NaN or infinite for {self._nonfinite_in_a_row} optimizer "
                f"steps in a row (max_nonfinite_steps={self.args.max_nonfinite_steps}); the weights were not "
                f"updated by those steps. Last good checkpoint: {last or 'none saved yet'}. Try a lower learning "
                "rate, --bf16 instead of --fp16, gradient clipping (--max_grad_norm), or check the data; resume "
                "with --resume_from_checkpoint last."
            )

    def _last_checkpoint(self) -> str | None:
        from transformers.trainer_utils import get_last_checkpoint

        if self.args.output_dir and os.path.isdir(self.args.output_dir):
            return get_last_checkpoint(self.args.output_dir)
        return None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation reports the CIM losses only: there are no logits a metric could consume.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---------------------------------------------------------------------------------- data

    def _get_train_sampler(self, train_dataset=None):
        # Per-sample seeds make the augmentations of a step independent of where a run was resumed;
        # the global RNG (token sampling) is restored from the checkpoint by the Trainer.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, SeededDataset):
            return SeededRandomSampler(len(dataset), seed=self.args.data_seed or self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # ---------------------------------------------------------------------------------- logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metric_steps:  # a training log: add the window's averages
            names = sorted(self._metric_sums)
            means = torch.stack([self._metric_sums[n] for n in names]) / self._metric_steps
            means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
            logs.update({name: round(value, 4) for name, value in zip(names, means.tolist())})
            logs["nonfinite_steps"] = self.nonfinite_steps
            self._metric_sums, self._metric_steps = {}, 0
        super().log(logs, start_time)

    # ---------------------------------------------------------------------------------- kNN monitor

    def knn_top1(self) -> float | None:
        """The enhancer's kNN top-1 accuracy on the monitor datasets (main process; None elsewhere)."""
        if self.knn_bank_dataset is None or self.knn_eval_dataset is None or not self.is_world_process_zero():
            return None
        enhancer = self.accelerator.unwrap_model(self.model).enhancer

        def loader(dataset):
            return DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.knn_collator,
                              num_workers=self.args.dataloader_num_workers)

        # Monitoring must not consume the training RNG, or a resumed run would diverge from an uninterrupted one.
        with torch.random.fork_rng(devices=[self.args.device] if self.args.device.type == "cuda" else []):
            with torch.autocast(self.args.device.type, enabled=False):
                bank, bank_labels = extract_features(enhancer, loader(self.knn_bank_dataset), self.args.device)
                queries, query_labels = extract_features(enhancer, loader(self.knn_eval_dataset), self.args.device)
        return knn_accuracy(bank, bank_labels, queries, query_labels, self.args.knn_k, self.args.knn_temperature)[1]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = {}
        if eval_dataset is not None or self.eval_dataset is not None:
            with torch.random.fork_rng(devices=[self.args.device] if self.args.device.type == "cuda" else []):
                metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        accuracy = self.knn_top1()
        if accuracy is not None:
            metrics[f"{metric_key_prefix}_knn_top1"] = accuracy
            self.log({f"{metric_key_prefix}_knn_top1": accuracy})
        return metrics

    def log_knn_baseline(self) -> None:
        """Log the untrained enhancer's kNN accuracy at step 0, and keep it in the output dir."""
        baseline = self.knn_top1()
        if baseline is None:
            return
        self.knn_baseline = baseline
        self.log({"eval_knn_top1": baseline})
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, KNN_BASELINE_FILE), "w") as f:
            json.dump({"knn_top1": baseline, "k": self.args.knn_k}, f)


class _KNNBaselineCallback(TrainerCallback):
    def __init__(self, trainer: CIMTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # not on resume: the baseline is the untrained enhancer's
            self.trainer.log_knn_baseline()
