"""Evaluation of CIM backbones: k-NN and linear probing on frozen features, fine-tuning with the
paper's recipes (``cim-eval``, ``cim-finetune``), and the results files that model cards read."""

from .backbone import ModelSource, find_model, image_settings, load_backbone, load_classifier
from .features import cached_features, extract_features
from .finetune import FINETUNE_PRESETS, FinetuneTrainer, RecipeArguments, layer_decay_param_groups
from .knn import knn_accuracy, knn_predict
from .linear_probe import LINEAR_PROBE_PRESETS, LinearProbe, train_linear_probe
from .metrics import topk_accuracy
from .results import RESULTS_FILES, card_results, read_results, write_results

__all__ = [
    "FINETUNE_PRESETS",
    "LINEAR_PROBE_PRESETS",
    "RESULTS_FILES",
    "FinetuneTrainer",
    "LinearProbe",
    "ModelSource",
    "RecipeArguments",
    "cached_features",
    "card_results",
    "extract_features",
    "find_model",
    "image_settings",
    "knn_accuracy",
    "knn_predict",
    "layer_decay_param_groups",
    "load_backbone",
    "load_classifier",
    "read_results",
    "topk_accuracy",
    "train_linear_probe",
    "write_results",
]
