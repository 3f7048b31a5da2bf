"""Evaluation of CIM backbones: k-NN and linear probing on frozen features, fine-tuning with the
paper's recipes (``cim-eval``, ``cim-finetune``), and the results files that model cards read."""

from .backbone import ModelSource, find_model, image_settings, load_backbone, load_classifier
from .finetune import FINETUNE_PRESETS, FinetuneTrainer, RecipeArguments, layer_decay_param_groups
from .linear_probe import LINEAR_PROBE_PRESETS, LinearProbe, train_linear_probe
from .results import RESULTS_FILES, card_results, read_results, write_results

__all__ = [
    "FINETUNE_PRESETS",
    "LINEAR_PROBE_PRESETS",
    "RESULTS_FILES",
    "FinetuneTrainer",
    "LinearProbe",
    "ModelSource",
    "RecipeArguments",
    "card_results",
    "find_model",
    "image_settings",
    "layer_decay_param_groups",
    "load_backbone",
    "load_classifier",
    "read_results",
    "train_linear_probe",
    "write_results",
]
