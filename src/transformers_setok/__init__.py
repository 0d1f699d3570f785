"""SeTok and Setokim for Hugging Face Transformers.

Importing this package registers every class with the `Auto*` factories, and marks them for
`save_pretrained` to write an `auto_map`, so saved folders also load with `trust_remote_code=True`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoProcessor,
)

from .clustering import ClusteringResult, density_peak_clustering
from .concept_contrastive import SetokConceptHead, concept_contrastive_loss
from .configuration_mask_decoder import SetokimMaskDecoderConfig
from .configuration_setok import SetokConfig
from .configuration_setok_detokenizer import SetokDetokenizerConfig
from .configuration_setok_pretraining import SetokForPreTrainingConfig
from .configuration_setokim import SetokimConfig
from .generation_setokim import SetokimImageGenerationOutput, SetokimVisionHead
from .image_processing_setok import SetokImageProcessor
from .metrics import load_metric
from .modeling_mask_decoder import SetokimMaskDecoder, SetokimSegmentationOutput
from .modeling_setok import SetokModel, SetokModelOutput, SetokPreTrainedModel
from .modeling_setok_detokenizer import SetokDetokenizer, SetokDetokenizerOutput, SetokTokenConditioner
from .modeling_setok_pretraining import SetokForPreTraining, SetokForPreTrainingOutput
from .modeling_setokim import (
    SetokimCausalLMOutputWithPast,
    SetokimForConditionalGeneration,
    SetokimImageFeatures,
    SetokimModel,
    SetokimModelOutputWithPast,
    SetokimPreTrainedModel,
)
from .part_learning_rates import part_learning_rates
from .pipeline_setok_detokenizer import SetokDetokenizerPipeline, SetokDetokenizerPipelineOutput
from .processing_setokim import IMAGE_END_TOKEN, IMAGE_START_TOKEN, IMAGE_TOKEN, SetokimProcessor
from .scene_reader import ReadObject, edit_applied, read_scene, shows_prompt
from .shapes_world import Scene, SceneObject, render_scene, scene_from_description, shapes_world
from .token_reduction import TokenReductionOutput, prompt_aware_token_reduction
from .tokenizer_training import train_sentencepiece_tokenizer
from .training import SetokimDataCollator, language_model_lora_config, set_trainable
from .visualization import draw_token_regions, token_label_map

AutoConfig.register(SetokConfig.model_type, SetokConfig, exist_ok=True)
AutoModel.register(SetokConfig, SetokModel, exist_ok=True)
AutoConfig.register(SetokimConfig.model_type, SetokimConfig, exist_ok=True)
AutoModel.register(SetokimConfig, SetokimModel, exist_ok=True)
AutoModelForImageTextToText.register(SetokimConfig, SetokimForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(SetokConfig, image_processor_classes={"pil": SetokImageProcessor}, exist_ok=True)
AutoProcessor.register(SetokimConfig, SetokimProcessor, exist_ok=True)
AutoConfig.register(SetokDetokenizerConfig.model_type, SetokDetokenizerConfig, exist_ok=True)
AutoModel.register(SetokDetokenizerConfig, SetokDetokenizer, exist_ok=True)
AutoConfig.register(SetokForPreTrainingConfig.model_type, SetokForPreTrainingConfig, exist_ok=True)
AutoModelForPreTraining.register(SetokForPreTrainingConfig, SetokForPreTraining, exist_ok=True)

SetokConfig.register_for_auto_class()
SetokModel.register_for_auto_class("AutoModel")
SetokimConfig.register_for_auto_class()
SetokimModel.register_for_auto_class("AutoModel")
SetokimForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
SetokImageProcessor.register_for_auto_class("AutoImageProcessor")
SetokimProcessor.register_for_auto_class("AutoProcessor")
SetokDetokenizerConfig.register_for_auto_class()
SetokDetokenizer.register_for_auto_class("AutoModel")
SetokForPreTrainingConfig.register_for_auto_class()
SetokForPreTraining.register_for_auto_class("AutoModelForPreTraining")

__version__ = "0.1.0"

__all__ = [
    "IMAGE_END_TOKEN",
    "IMAGE_START_TOKEN",
    "IMAGE_TOKEN",
    "SetokimDataCollator",
    "SetokimProcessor",
    "train_sentencepiece_tokenizer",
    "ClusteringResult",
    "SetokConceptHead",
    "SetokConfig",
    "SetokDetokenizer",
    "SetokDetokenizerConfig",
    "SetokDetokenizerOutput",
    "SetokDetokenizerPipeline",
    "SetokDetokenizerPipelineOutput",
    "SetokForPreTraining",
    "SetokForPreTrainingConfig",
    "SetokForPreTrainingOutput",
    "SetokTokenConditioner",
    "concept_contrastive_loss",
    "SetokImageProcessor",
    "SetokModel",
    "SetokModelOutput",
    "SetokPreTrainedModel",
    "SetokimCausalLMOutputWithPast",
    "SetokimConfig",
    "SetokimForConditionalGeneration",
    "SetokimImageFeatures",
    "SetokimImageGenerationOutput",
    "SetokimMaskDecoder",
    "SetokimMaskDecoderConfig",
    "SetokimSegmentationOutput",
    "SetokimVisionHead",
    "SetokimModel",
    "SetokimModelOutputWithPast",
    "SetokimPreTrainedModel",
    "density_peak_clustering",
    "draw_token_regions",
    "language_model_lora_config",
    "part_learning_rates",
    "set_trainable",
    "token_label_map",
    "TokenReductionOutput",
    "prompt_aware_token_reduction",
    "load_metric",
    "ReadObject",
    "edit_applied",
    "read_scene",
    "shows_prompt",
    "Scene",
    "SceneObject",
    "render_scene",
    "scene_from_description",
    "shapes_world",
]
