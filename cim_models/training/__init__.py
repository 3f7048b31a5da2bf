"""CIM pre-training: ``CIMTrainer`` (the transformers Trainer plus what a CIM loop needs), its
callbacks, the presets and the ``cim-pretrain`` command. Its data comes from ``cim_models.data``.
"""

from .callbacks import ImageGridCallback
from .presets import PRESETS
from .trainer import CIMTrainer, CIMTrainingArguments, NonFiniteLossError

__all__ = [
    "PRESETS",
    "CIMTrainer",
    "CIMTrainingArguments",
    "ImageGridCallback",
    "NonFiniteLossError",
]
