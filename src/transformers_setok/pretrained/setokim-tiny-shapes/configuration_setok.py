"""Configuration of the SeTok vision tokenizer."""

from __future__ import annotations

from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


@strict
class SetokConfig(PreTrainedConfig):
    r"""Configuration of [`SetokVisionTokenizer`]: a vision encoder, density-peak clustering and a token merger.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            Config of any Hugging Face vision model; SigLIP so400m-patch14-384 sizes by default.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Hidden-state index the patch features are taken from (the paper uses the second-to-last layer). The
            encoder's later layers and pooling head do not run (their weights stay in the checkpoint).
        vision_feature_select_strategy (`str`, *optional*, defaults to `"full"`):
            `"full"` keeps every token of that layer; `"default"` drops the first one (a CLS token, as in CLIP).
        cluster_k (`int`, *optional*, defaults to 5):
            Neighbours used to estimate each patch's local density.
        cluster_threshold (`float`, *optional*, defaults to 0.5):
            Patches whose `density * delta` score exceeds this become cluster centres.
        min_tokens (`int`, *optional*, defaults to 1):
            Fewest tokens per image; when fewer patches pass the threshold the best-scoring ones are taken.
        max_tokens (`int`, *optional*):
            Most tokens per image; `None` means no bound beyond the patch count.
        hidden_size (`int`, *optional*):
            Width of the merger; the vision hidden size when `None` (no input projection is then needed).
        num_attention_heads (`int`, *optional*, defaults to 2):
            Attention heads of both merger transformers.
        inner_layers (`int`, *optional*, defaults to 2):
            Attention layers of the transformer that runs inside each cluster.
        inter_layers (`int`, *optional*, defaults to 2):
            Attention layers of the transformer that runs across cluster tokens.
        intermediate_size (`int`, *optional*, defaults to 4096):
            Hidden width of the MLP closing each merger transformer.
        token_size (`int`, *optional*, defaults to 4096):
            Width of the output tokens.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the merger MLPs.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention and MLP outputs of the merger.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on merger attention probabilities.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the merger LayerNorms.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation used when initialising the encoder if it is built from scratch.
    """

    model_type = "setok"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="siglip_vision_model",
            init_kwargs={
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_hidden_layers": 27,
                "num_attention_heads": 16,
                "image_size": 384,
                "patch_size": 14,
            },
        )
    }

    vision_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["full", "default"] = "full"
    cluster_k: int = 5
    cluster_threshold: float = 0.5
    min_tokens: int = 1
    max_tokens: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int = 2
    inner_layers: int = 2
    inter_layers: int = 2
    intermediate_size: int = 4096
    token_size: int = 4096
    hidden_act: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.hidden_size is None:
            self.hidden_size = self.vision_config.hidden_size

    def validate_clustering(self) -> None:
        """Reject clustering settings that cannot work, naming the argument."""
        if self.vision_feature_select_strategy not in ("full", "default"):
            raise ValueError(
                "vision_feature_select_strategy must be 'full' or 'default', "
                f"got {self.vision_feature_select_strategy!r}"
            )
        if self.cluster_k < 1:
            raise ValueError(f"cluster_k must be >= 1, got {self.cluster_k}")
        if not self.cluster_threshold >= 0:
            raise ValueError(f"cluster_threshold must be >= 0, got {self.cluster_threshold}")
        if self.min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {self.min_tokens}")
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be >= min_tokens ({self.min_tokens})")

    def validate_architecture(self) -> None:
        """The merger's width must split evenly over its heads."""
        hidden_size = self.hidden_size if self.hidden_size is not None else self.vision_config.hidden_size
        if hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )

    @property
    def patch_grid_size(self) -> tuple[int, int]:
        """Patches per side of the encoder's square input."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        return side, side
