"""SeTok, the vision tokenizer: vision encoder -> density-peak clustering -> token merger."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .clustering import density_peak_clustering
from .configuration_setok import SetokConfig


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
    """

    tokens: torch.FloatTensor | None = None
    token_mask: torch.BoolTensor | None = None
    num_tokens: torch.LongTensor | None = None
    assignment: torch.LongTensor | None = None
    centers: torch.LongTensor | None = None
    scores: torch.FloatTensor | None = None
    patch_features: torch.FloatTensor | None = None
    grid_size: tuple[int, int] | None = None


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


class SetokAttention(nn.Module):
    """Multi-head self-attention with a boolean `(batch, query, key)` mask of allowed pairs."""

    def __init__(self, config: SetokConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_dropout
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.BoolTensor) -> torch.Tensor:
        batch_size, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch_size, length, 3, self.num_heads, width // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask[:, None],
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        return self.dropout(self.proj(attended.transpose(1, 2).reshape(batch_size, length, width)))


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

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.BoolTensor) -> torch.Tensor:
        return hidden_states + self.attention(self.norm(hidden_states), attention_mask)


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

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.BoolTensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


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
    ) -> torch.Tensor:
        same_cluster = assignment[:, :, None] == assignment[:, None, :]
        patches = self.inner_encoder(patches, same_cluster)

        membership = nn.functional.one_hot(assignment.clamp(min=0), token_mask.shape[1]).to(patches.dtype)
        membership = membership * (assignment >= 0)[..., None].to(patches.dtype)
        sizes = membership.sum(dim=1).clamp(min=1)
        pooled = membership.transpose(1, 2) @ patches / sizes[..., None]

        pairs = token_mask[:, None, :].expand(-1, token_mask.shape[1], -1)
        tokens = self.out(self.inter_encoder(pooled, pairs))
        return tokens * token_mask[..., None].to(tokens.dtype)


class SetokPreTrainedModel(PreTrainedModel):
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
        check_pixel_values(pixel_values, self.config.vision_config.num_channels)
        encoded = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        features = encoded.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        patch_size = self.config.vision_config.patch_size
        grid_size = (pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size)
        if grid_size[0] * grid_size[1] != features.shape[1]:
            raise ValueError(
                f"pixel_values of size {tuple(pixel_values.shape[-2:])} give a {grid_size} patch grid, but the "
                f"encoder returned {features.shape[1]} patch features; check vision_feature_select_strategy"
            )
        return features, grid_size

    def tokenize_features(
        self,
        patch_features: torch.Tensor,
        grid_size: tuple[int, int],
        cluster_threshold: float | None = None,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
        cluster_k: int | None = None,
    ) -> SetokModelOutput:
        """Cluster and merge precomputed patch features (the tokenizer head, encoder excluded)."""
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
        tokens = self.merger(self.input_projection(features), clusters.assignment, clusters.center_mask)
        return SetokModelOutput(
            tokens=tokens,
            token_mask=clusters.center_mask,
            num_tokens=clusters.num_tokens,
            assignment=clusters.assignment,
            centers=clusters.centers,
            scores=clusters.scores,
            patch_features=patch_features,
            grid_size=grid_size,
        )

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        cluster_threshold: float | None = None,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
        cluster_k: int | None = None,
    ) -> SetokModelOutput:
        """Tokenize `pixel_values` of shape `(batch, channels, height, width)`.

        `cluster_threshold`, `min_tokens`, `max_tokens` and `cluster_k` override the config for this call.
        """
        patch_features, grid_size = self.get_patch_features(pixel_values)
        return self.tokenize_features(
            patch_features,
            grid_size,
            cluster_threshold=cluster_threshold,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
            cluster_k=cluster_k,
        )


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


__all__ = ["SetokModel", "SetokModelOutput", "SetokPreTrainedModel"]
