"""SeTok and Setokim for Hugging Face Transformers.

Importing this package registers every class with the `Auto*` factories, and marks them for
`save_pretrained` to write an `auto_map`, so saved folders also load with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .clustering import ClusteringResult, density_peak_clustering
from .configuration_setok import SetokConfig
from .image_processing_setok import SetokImageProcessor
from .modeling_setok import SetokModel, SetokModelOutput, SetokPreTrainedModel

AutoConfig.register(SetokConfig.model_type, SetokConfig, exist_ok=True)
AutoModel.register(SetokConfig, SetokModel, exist_ok=True)
AutoImageProcessor.register(SetokConfig, image_processor_classes={"pil": SetokImageProcessor}, exist_ok=True)

SetokConfig.register_for_auto_class()
SetokModel.register_for_auto_class("AutoModel")
SetokImageProcessor.register_for_auto_class("AutoImageProcessor")

__version__ = "0.1.0"

__all__ = [
    "ClusteringResult",
    "SetokConfig",
    "SetokImageProcessor",
    "SetokModel",
    "SetokModelOutput",
    "SetokPreTrainedModel",
    "density_peak_clustering",
]
