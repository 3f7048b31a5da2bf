"""cim-models: Corrupted Image Modeling (Fang et al., ICLR 2023) for timm and transformers.

Importing the package registers the CIM enhancers with timm
(``timm.create_model("cim_vit_base")``) and the CIM classes with the transformers Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from . import enhancers  # noqa: F401  (registers the timm models)
from .configuration_cim import CIMConfig
from .generator import CIMGenerator, sample_tokens
from .masking import BlockMaskingGenerator
from .modeling_cim import CIMForImageClassification, CIMModel, CIMPreTrainedModel
from .pretraining import CIMForPreTraining, CIMForPreTrainingOutput
from .tokenizers import create_tokenizer

# The transformers Auto classes: a CIM checkpoint (save_pretrained, the Trainer) loads as the CIM
# classes. An exported Hub repo is timm-shaped: AutoModel gives transformers' own TimmWrapperModel,
# and CIMModel.from_pretrained reads it too.
AutoConfig.register("cim", CIMConfig, exist_ok=True)
AutoModel.register(CIMConfig, CIMModel, exist_ok=True)
AutoModelForImageClassification.register(CIMConfig, CIMForImageClassification, exist_ok=True)
AutoModelForPreTraining.register(CIMConfig, CIMForPreTraining, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "BlockMaskingGenerator",
    "CIMConfig",
    "CIMForImageClassification",
    "CIMForPreTraining",
    "CIMForPreTrainingOutput",
    "CIMGenerator",
    "CIMModel",
    "CIMPreTrainedModel",
    "create_tokenizer",
    "sample_tokens",
]
