"""SeTok, the vision tokenizer: vision encoder -> density-peak clustering -> token merger."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .clustering import density_peak_clustering
from .configuration_setok import SetokConfig

logger = logging.get_logger(__name__)


@dataclass
class SetokModelOutput(ModelOutput):
    """Tokens of a batch of images, padded to the largest count in the batch.

    Attributes:
        tokens: `(batch, max_tokens, token_size)` one token per semantic region; zeros in padding slots.
        token_mask: `(batch, max_tokens)` which slots hold a real token.
        num_tokens: `(batch,)` tokens per image.
        assignment: `(batch, num_patches)` token each patch belongs to (row-major patch order); -1 for none.
        centers: `(batch, max_tokens)` patch index of each token's cluster centre; -1 in padding slots.
        scores: `(batch, num_patches)` density-peak score `density * delta` of every patch.
        patch_features: `(batch, num_patches, vision_hidden_size)` encoder features the tokens were built from.
        grid_size: `(height, width)` of the patch grid, so `assignment.view(batch, *grid_size)` is a label map.
        hidden_states: with `output_hidden_states=True`, every hidden state of the vision encoder.
        attentions: with `output_attentions=True`, the vision encoder's attention weights, one per encoder layer (as
            every Transformers vision model returns them beside its hidden states).
        merger_attentions: with `output_attentions=True`, the token merger's attention weights
            `(batch, heads, query, key)`, inner layers first, then inter layers (`None` entries where the kernel gives
            no weights: use eager).
    """

    tokens: torch.FloatTensor | None = None
    token_mask: torch.BoolTensor | None = None
    num_tokens: torch.LongTensor | None = None
    assignment: torch.LongTensor | None = None
    centers: torch.LongTensor | None = None
    scores: torch.FloatTensor | None = None
    patch_features: torch.FloatTensor | None = None
    grid_size: tuple[int, int] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor | None, ...] | None = None
    merger_attentions: tuple[torch.FloatTensor | None, ...] | None = None


CLUSTERING_ARGUMENTS = ("cluster_threshold", "min_tokens", "max_tokens", "cluster_k")
"""The per-call clustering overrides every tokenizing entry point takes (the config's values otherwise)."""


def sincos_position_code(height: int, width: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Fixed 2-D sin-cos code of shape `(height * width, dim)`, row-major.

    The first half of the channels encodes the row, the second the column, sines and cosines interleaved
    (the layout of the official SeTok code, so converted weights see the same inputs).
    """
    channels = 2 * ((dim + 3) // 4)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, channels, 2, device=device, dtype=torch.float32) / channels))

    def encode(positions: int) -> torch.Tensor:
        angles = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)

    rows = encode(height)[:, None, :].expand(height, width, channels)
    cols = encode(width)[None, :, :].expand(height, width, channels)
    return torch.cat((rows, cols), dim=-1)[..., :dim].reshape(height * width, dim).to(dtype)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention with an additive mask; the `attn_implementation="eager"` path."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def additive_attention_mask(allowed: torch.BoolTensor, dtype: torch.dtype) -> torch.Tensor:
    """`(batch, query, key)` allowed pairs -> the `(batch, 1, query, key)` additive mask attention kernels take."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )[:, None]


class SetokAttention(nn.Module):
    """Multi-head self-attention over allowed pairs, through Transformers' attention interface.

    `config._attn_implementation` picks the kernel (`eager`, `sdpa`, or any registered one that takes an
    arbitrary additive mask), so `attn_implementation=` and `set_attn_implementation` reach the merger.
    """

    is_causal = False

    def __init__(self, config: SetokConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_dropout
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_mask` is additive, `(batch, 1, query, key)`; returns the output and the attention weights
        (`None` where the kernel does not give them)."""
        batch_size, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch_size, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        attended, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
            is_causal=False,
        )
        return self.dropout(self.proj(attended.reshape(batch_size, length, width))), weights


class SetokMLP(nn.Module):
    def __init__(self, config: SetokConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(hidden_states)))))


class SetokAttentionLayer(GradientCheckpointingLayer):
    """Pre-norm residual attention."""

    def __init__(self, config: SetokConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = SetokAttention(config)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attention(self.norm(hidden_states), attention_mask)
        return hidden_states + attended, weights


class SetokMergerEncoder(nn.Module):
    """`num_layers` residual attention layers, then one residual MLP.

    This is the block shape of the SeTok paper's merger (one MLP per block, not per layer), so official
    weights map onto it exactly; its shared pre-attention LayerNorm becomes one copy per layer here.
    """

    def __init__(self, config: SetokConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SetokAttentionLayer(config) for _ in range(num_layers))
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SetokMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, allowed: torch.BoolTensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """`allowed` is the `(batch, query, key)` boolean mask of pairs that may attend; returns the states and
        each layer's attention weights."""
        attention_mask = additive_attention_mask(allowed, hidden_states.dtype)
        all_weights = []
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, attention_mask)
            all_weights.append(weights)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states)), tuple(all_weights)


class SetokTokenMerger(nn.Module):
    """Turns clustered patches into one token per cluster, for a whole padded batch at once.

    Within-cluster attention is ordinary attention restricted to same-cluster pairs, which is the same
    computation as running the inner encoder on every cluster alone; members are then mean-pooled, the
    cluster tokens attend to each other (padding masked) and a linear layer maps them to the token width.
    """

    def __init__(self, config: SetokConfig) -> None:
        super().__init__()
        self.inner_encoder = SetokMergerEncoder(config, config.inner_layers)
        self.inter_encoder = SetokMergerEncoder(config, config.inter_layers)
        self.out = nn.Linear(config.hidden_size, config.token_size)

    def forward(
        self, patches: torch.Tensor, assignment: torch.LongTensor, token_mask: torch.BoolTensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """Tokens `(batch, max_tokens, token_size)` (zeros in padding slots) and the attention weights of every
        inner layer, then every inter layer."""
        same_cluster = assignment[:, :, None] == assignment[:, None, :]
        patches, inner_weights = self.inner_encoder(patches, same_cluster)

        membership = nn.functional.one_hot(assignment.clamp(min=0), token_mask.shape[1]).to(patches.dtype)
        membership = membership * (assignment >= 0)[..., None].to(patches.dtype)
        sizes = membership.sum(dim=1).clamp(min=1)
        pooled = membership.transpose(1, 2) @ patches / sizes[..., None]

        pairs = token_mask[:, None, :].expand(-1, token_mask.shape[1], -1)
        merged, inter_weights = self.inter_encoder(pooled, pairs)
        tokens = self.out(merged)
        return tokens * token_mask[..., None].to(tokens.dtype), inner_weights + inter_weights


class NativePartsInitialization:
    """Initialises the native Transformers models inside a plugin model (vision encoder, language model) as native
    code.

    Transformers initialises a plugin model as custom code, skipping every module without parameters of its own,
    and hands that mode down to the native models inside it, whose module-level inits (SigLIP's attention and MLP
    set their layers) would then be skipped: `from_pretrained` would fill missing weights unlike the constructor.
    Initialised first, on their own terms, they are then left alone.
    """

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, PreTrainedModel) and not module.is_custom_code():
                module.initialize_weights()
        super().initialize_weights()


class SetokPreTrainedModel(NativePartsInitialization, PreTrainedModel):
    config: SetokConfig
    config_class = SetokConfig
    base_model_prefix = "setok"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["SetokAttentionLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """Xavier-uniform merger weights with zero biases, as the paper's merger is initialised."""
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class SetokModel(SetokPreTrainedModel):
    """The SeTok vision tokenizer: images in, a variable number of semantic tokens per image out."""

    def __init__(self, config: SetokConfig) -> None:
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config)
        vision_width = config.vision_config.hidden_size
        self.input_projection = (
            nn.Identity() if vision_width == config.hidden_size else nn.Linear(vision_width, config.hidden_size)
        )
        self.merger = SetokTokenMerger(config)
        self.post_init()

    def get_patch_features(self, pixel_values: torch.FloatTensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encoder features of the configured layer, `(batch, height * width, vision_hidden_size)`, and the grid."""
        encoded = self.encode(pixel_values)
        return encoded.features, encoded.grid_size

    def encode(
        self, pixel_values: torch.FloatTensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> EncodedImages:
        """Patch features of the configured layer, the patch grid, and (if asked) every hidden state and attention
        map of the encoder.

        Images of another size than the encoder was built for are encoded at their own resolution where the
        encoder can interpolate its position embeddings (SigLIP, CLIP, ViT), so the grid follows the image.
        Unless every hidden state or attention map is asked for, the encoder stops at the configured layer (see
        [`run_vision_model`]).
        """
        vision_config = self.config.vision_config
        check_pixel_values(pixel_values, vision_config.num_channels)
        patch_size = vision_config.patch_size
        height, width = pixel_values.shape[-2:]
        native_size = (vision_config.image_size, vision_config.image_size)
        # at its own size an encoder may leave edge pixels out (so400m-patch14-384: 27 patches of 14 in 384)
        if (height, width) != native_size and (height % patch_size or width % patch_size):
            raise ValueError(
                f"pixel_values of size {(height, width)} do not split into {patch_size}x{patch_size} patches; "
                f"resize images to multiples of {patch_size} (the image processor does this)"
            )
        encoder_kwargs = {}
        if (height, width) != native_size and (
            "interpolate_pos_encoding" in inspect.signature(self.vision_model.forward).parameters
        ):
            encoder_kwargs["interpolate_pos_encoding"] = True
        try:
            encoded = self.run_vision_model(pixel_values, output_hidden_states, output_attentions, **encoder_kwargs)
        except RuntimeError as error:
            if (height, width) == native_size:
                raise
            raise ValueError(
                f"pixel_values must be {native_size[0]}x{native_size[1]} for this encoder "
                f"({type(self.vision_model).__name__} cannot take other sizes), got {height}x{width}; use the "
                "checkpoint's image processor"
            ) from error
        features = encoded.features
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        grid_size = (height // patch_size, width // patch_size)
        if grid_size[0] * grid_size[1] != features.shape[1]:
            raise ValueError(
                f"pixel_values of size {(height, width)} give a {grid_size} patch grid, but the encoder returned "
                f"{features.shape[1]} patch features; check vision_feature_select_strategy"
            )
        return EncodedImages(features, grid_size, encoded.hidden_states, encoded.attentions)

    def run_vision_model(
        self,
        pixel_values: torch.FloatTensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **encoder_kwargs: Any,
    ) -> EncodedImages:
        """The configured layer's hidden state and, as asked, every hidden state and every attention map.

        Hidden state `i` is the input of encoder layer `i`, so the encoder is stopped as that layer is entered: the
        later layers, the final norm and the pooling head never run (nor get gradients) when an earlier layer is
        read, while their weights stay in the model, so checkpoints save and load unchanged. Encoders whose layers
        cannot be found (no `nn.ModuleList` of `num_hidden_layers` modules) run whole, as every encoder does when
        all its hidden states or attention maps are asked for. `grid_size` is left to the caller.
        """
        layers = encoder_layers(self.vision_model)
        layer = self.config.vision_feature_layer
        if layers is not None and not -len(layers) - 1 <= layer <= len(layers):
            raise ValueError(
                f"vision_feature_layer must index the {len(layers) + 1} hidden states of the vision encoder, "
                f"got {layer}"
            )
        if output_hidden_states or output_attentions or layers is None or layer % (len(layers) + 1) == len(layers):
            outputs = self.vision_model(
                pixel_values=pixel_values,
                output_hidden_states=True,
                output_attentions=output_attentions,
                return_dict=True,
                **encoder_kwargs,
            )
            return EncodedImages(
                features=outputs.hidden_states[layer],
                hidden_states=outputs.hidden_states if output_hidden_states else None,
                attentions=outputs.attentions if output_attentions else None,
            )

        def stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise FeatureLayerReached(args[0] if args else kwargs["hidden_states"])

        handle = layers[layer % (len(layers) + 1)].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.vision_model(pixel_values=pixel_values, **encoder_kwargs)
        except FeatureLayerReached as reached:
            return EncodedImages(features=reached.hidden_state)
        finally:
            handle.remove()
        raise RuntimeError(f"{type(self.vision_model).__name__} never entered layer {layer} of its encoder")

    def tokenize_features(
        self,
        patch_features: torch.Tensor,
        grid_size: tuple[int, int],
        cluster_threshold: float | None = None,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
        cluster_k: int | None = None,
        output_attentions: bool = False,
    ) -> SetokModelOutput:
        """Cluster and merge precomputed patch features (the tokenizer head, encoder excluded); with
        `output_attentions`, the merger's weights are in `merger_attentions`."""
        config = self.config
        features = patch_features + sincos_position_code(
            *grid_size, patch_features.shape[-1], patch_features.dtype, patch_features.device
        )
        clusters = density_peak_clustering(
            features,
            k=config.cluster_k if cluster_k is None else cluster_k,
            threshold=config.cluster_threshold if cluster_threshold is None else cluster_threshold,
            min_tokens=config.min_tokens if min_tokens is None else min_tokens,
            max_tokens=config.max_tokens if max_tokens is None else max_tokens,
        )
        tokens, attentions = self.merger(self.input_projection(features), clusters.assignment, clusters.center_mask)
        return SetokModelOutput(
            tokens=tokens,
            token_mask=clusters.center_mask,
            num_tokens=clusters.num_tokens,
            assignment=clusters.assignment,
            centers=clusters.centers,
            scores=clusters.scores,
            patch_features=patch_features,
            grid_size=grid_size,
            merger_attentions=attentions if output_attentions else None,
        )

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        cluster_threshold: float | None = None,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
        cluster_k: int | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> SetokModelOutput:
        """Tokenize `pixel_values` of shape `(batch, channels, height, width)`.

        `cluster_threshold`, `min_tokens`, `max_tokens` and `cluster_k` override the config for this call.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        encoded = self.encode(pixel_values, output_hidden_states, output_attentions)
        output = self.tokenize_features(
            encoded.features,
            encoded.grid_size,
            cluster_threshold=cluster_threshold,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
            cluster_k=cluster_k,
            output_attentions=output_attentions,
        )
        output.hidden_states, output.attentions = encoded.hidden_states, encoded.attentions
        return output


@dataclass
class EncodedImages:
    """What the vision encoder gave: patch features of the configured layer and what else was asked for."""

    features: torch.Tensor
    grid_size: tuple[int, int] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class FeatureLayerReached(Exception):
    """Stops a vision encoder as its feature layer is entered, carrying that layer's input hidden state."""

    def __init__(self, hidden_state: torch.Tensor) -> None:
        super().__init__("the vision encoder reached its feature layer")
        self.hidden_state = hidden_state


def encoder_layers(vision_model: nn.Module) -> nn.ModuleList | None:
    """The encoder's transformer layers: the first `nn.ModuleList` holding `config.num_hidden_layers` modules."""
    num_layers = getattr(vision_model.config, "num_hidden_layers", None)
    lists = (module for module in vision_model.modules() if isinstance(module, nn.ModuleList))
    return next((layers for layers in lists if len(layers) == num_layers), None)


UNNORMALISED_PIXEL_BOUND = 5.0
"""Normalised pixels stay within about 2.7 in magnitude (ImageNet statistics); raw 0-255 ones go far past 5."""


def check_pixel_values(pixel_values: torch.Tensor, num_channels: int) -> None:
    """Raise a clear error for pixel values a vision encoder cannot take."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4:
        raise ValueError(
            f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values holds no image (batch size 0)")
    if pixel_values.shape[1] != num_channels:
        raise ValueError(f"pixel_values must have {num_channels} channels, got {pixel_values.shape[1]}")
    if not torch.isfinite(pixel_values).all():
        raise ValueError("pixel_values must be finite, found NaN or infinity")
    largest = float(pixel_values.abs().amax())
    if largest > UNNORMALISED_PIXEL_BOUND:
        logger.warning(
            f"pixel_values reach {largest:g}: they look unnormalised (raw 0-255 pixels?); the encoder expects "
            "normalised values, which the image processor gives: processor(images=..., return_tensors='pt')"
        )


__all__ = ["SetokModel", "SetokModelOutput", "SetokPreTrainedModel"]
