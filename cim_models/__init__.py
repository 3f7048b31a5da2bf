"""cim-models: Corrupted Image Modeling (Fang et al., ICLR 2023) for timm and transformers.

Importing the package registers the CIM enhancers with timm (``timm.create_model("cim_vit_base")``)
and the CIM classes with the transformers Auto classes.
"""

from . import enhancers  # noqa: F401  (registers the timm models)
from .configuration_cim import CIMConfig
from .generator import CIMGenerator, sample_tokens
from .masking import BlockMaskingGenerator
from .modeling_cim import CIMPreTrainedModel
from .pretraining import CIMForPreTraining, CIMForPreTrainingOutput
from .tokenizers import create_tokenizer

__version__ = "0.1.0"

__all__ = [
    "BlockMaskingGenerator",
    "CIMConfig",
    "CIMForPreTraining",
    "CIMForPreTrainingOutput",
    "CIMGenerator",
    "CIMPreTrainedModel",
    "create_tokenizer",
    "sample_tokens",
]
