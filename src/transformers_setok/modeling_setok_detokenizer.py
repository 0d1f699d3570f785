"""The SeTok detokenizer: a diffusers `UNet2DConditionModel` that cross-attends to an image's SeTok tokens.

The tokens are a padded *set* (a different count per image), so the U-Net reads them as
`encoder_hidden_states` with a full-length `encoder_attention_mask`; padding slots get exactly zero attention, in
every attention that reads the tokens (`TokenSetAttnProcessor`).
Learned null tokens stand in for the tokens when training for classifier-free guidance.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_setok_detokenizer import SetokDetokenizerConfig

logger = logging.getLogger(__name__)

# U-Net settings through which Stable-Diffusion-style models read a text encoder's outputs besides
# cross-attention; tokens replace the text, so these are switched off (their weights are dropped).
TEXT_CONDITIONING_SETTINGS = ("encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type", "class_embed_type")


@dataclass
class SetokDetokenizerOutput(ModelOutput):
    """Denoising loss of one training step.

    Attributes:
        loss: mean squared error between the U-Net's prediction and its target.
        model_output: `(batch, channels, height, width)` what the U-Net predicted.
        target: the noise, velocity or clean sample it should have predicted (the scheduler's `prediction_type`).
    """

    loss: torch.FloatTensor | None = None
    model_output: torch.FloatTensor | None = None
    target: torch.FloatTensor | None = None


def pad_token_set(
    tokens: torch.Tensor, token_mask: torch.BoolTensor, length: int
) -> tuple[torch.Tensor, torch.BoolTensor]:
    """Grow a padded token set to `length` slots with masked zeros (a no-op when it is long enough)."""
    extra = length - tokens.shape[1]
    if extra <= 0:
        return tokens, token_mask
    return nn.functional.pad(tokens, (0, 0, 0, extra)), nn.functional.pad(token_mask, (0, extra))


class TokenSetAttnProcessor(AttnProcessor2_0):
    """diffusers' attention, with the token set's padding masked in every attention that reads the tokens.

    Blocks built with `only_cross_attention` (the tiny recipe's U-Net) attend to the tokens in their first
    attention as well, which diffusers calls with the image's self-attention mask (none), not the tokens': padding
    slots would get attention there, and a drawing would change with its batch's padding. The tokens' mask comes
    as `token_bias` through `cross_attention_kwargs` and stands in wherever the tokens are read without a mask.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        token_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None and encoder_hidden_states is not None:
            attention_mask = token_bias
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def use_token_set_attention(unet: UNet2DConditionModel) -> None:
    """Swap diffusers' default attention processors of `unet` for `TokenSetAttnProcessor`; others are kept."""
    processors = unet.attn_processors
    unet.set_attn_processor(
        {name: TokenSetAttnProcessor() if type(p) is AttnProcessor2_0 else p for name, p in processors.items()}
    )


class SetokTokenConditioner(ModelMixin, ConfigMixin):
    """SeTok tokens -> the U-Net's `encoder_hidden_states` and `encoder_attention_mask`.

    A linear projection maps token width to cross-attention width; `num_null_tokens` learned tokens (in token
    space, so they pass the same projection) are the "no image" condition of classifier-free guidance.

    With `coordinate_channels`, the U-Net input also gets fixed Fourier features of each pixel's position: the
    sine and cosine of `pi * 2**k * x` and of `pi * 2**k * y` (`x`, `y` in `[-1, 1]`) for `k < coordinate_channels
    / 4`. A token says where its region lies (SeTok mixes a sin-cos position code into it), and cross-attention
    can only put it there if the U-Net's queries carry a code of where they are that a linear map can match to the
    token's; convolutions alone learn one slowly.

    With `canvas_channels` (which needs the coordinate code), the U-Net input also gets the token set painted onto
    the pixels, as object-centric decoders broadcast their slots: each pixel takes a softmax over the real tokens
    of how well a token's key matches a learned query of the pixel's position code, and mixes the tokens' values
    (`canvas_channels` wide) by it. Which token owns which pixels is then an input of the first convolution, not
    something cross-attention must learn to bind; and since the canvas comes from the tokens alone, a drawing from
    generated tokens gets one too.
    """

    @register_to_config
    def __init__(
        self,
        token_size: int,
        cross_attention_dim: int,
        num_null_tokens: int = 1,
        coordinate_channels: int = 0,
        canvas_channels: int = 0,
    ) -> None:
        super().__init__()
        if coordinate_channels % 4:
            raise ValueError(
                f"coordinate_channels must be a multiple of 4 (sin, cos of x, y), got {coordinate_channels}"
            )
        if canvas_channels and not coordinate_channels:
            raise ValueError("canvas_channels needs coordinate_channels: the canvas places tokens by that code")
        self.projection = nn.Linear(token_size, cross_attention_dim)
        self.null_tokens = nn.Parameter(0.02 * torch.randn(num_null_tokens, token_size))
        if canvas_channels:
            self.canvas_query = nn.Sequential(
                nn.Linear(coordinate_channels, cross_attention_dim),
                nn.GELU(),
                nn.Linear(cross_attention_dim, cross_attention_dim),
            )
            self.canvas_key = nn.Linear(cross_attention_dim, cross_attention_dim)
            self.canvas_value = nn.Linear(cross_attention_dim, canvas_channels)

    def coordinate_code(self, sample: torch.Tensor) -> torch.Tensor:
        """`(coordinate_channels, height, width)`: the Fourier code of each pixel's position in `sample`."""
        num_frequencies = self.config.coordinate_channels // 4
        _, _, height, width = sample.shape
        frequencies = torch.pi * 2.0 ** torch.arange(num_frequencies, device=sample.device, dtype=sample.dtype)
        ys = torch.linspace(-1, 1, height, device=sample.device, dtype=sample.dtype)[:, None, None] * frequencies
        xs = torch.linspace(-1, 1, width, device=sample.device, dtype=sample.dtype)[None, :, None] * frequencies
        ys, xs = ys.expand(height, width, -1), xs.expand(height, width, -1)
        return torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], dim=-1).permute(2, 0, 1)

    def canvas_weights(
        self, code: torch.Tensor, hidden_states: torch.Tensor, attention_mask: torch.BoolTensor
    ) -> torch.Tensor:
        """`(batch, length, height, width)`: each pixel's share of each projected token (zero for padding)."""
        query = self.canvas_query(code.permute(1, 2, 0))  # (height, width, dim)
        key = self.canvas_key(hidden_states)  # (batch, length, dim)
        logits = torch.einsum("hwd,bnd->bnhw", query, key) / key.shape[-1] ** 0.5
        logits = logits.masked_fill(~attention_mask[:, :, None, None], torch.finfo(logits.dtype).min)
        return logits.softmax(dim=1)

    def unet_input(
        self, sample: torch.Tensor, hidden_states: torch.Tensor, attention_mask: torch.BoolTensor
    ) -> torch.Tensor:
        """What the U-Net reads: the noisy sample, then the coordinate and canvas channels the config asks for."""
        if self.config.coordinate_channels == 0:
            return sample
        batch_size = sample.shape[0]
        code = self.coordinate_code(sample)
        channels = [sample, code[None].expand(batch_size, -1, -1, -1)]
        if self.config.canvas_channels:
            weights = self.canvas_weights(code, hidden_states, attention_mask)
            channels.append(torch.einsum("bnhw,bnc->bchw", weights, self.canvas_value(hidden_states)))
        return torch.cat(channels, dim=1)

    def predict(
        self,
        unet: UNet2DConditionModel,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        hidden_states: torch.Tensor,
        attention_mask: torch.BoolTensor,
    ) -> torch.Tensor:
        """The U-Net's output for a noisy `sample`, reading the projected tokens `hidden_states` (from `forward`)
        through the coordinate and canvas channels and `attention_mask` in every attention
        (`TokenSetAttnProcessor`)."""
        token_bias = (1 - attention_mask.to(hidden_states.dtype)) * -10000.0  # diffusers' own mask-to-bias
        return unet(
            self.unet_input(sample, hidden_states, attention_mask),
            timesteps,
            encoder_hidden_states=hidden_states,
            encoder_attention_mask=attention_mask,
            cross_attention_kwargs={"token_bias": token_bias[:, None, :]},
        ).sample

    def check_tokens(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> None:
        """Raise a `ValueError` naming the argument for tokens or masks the U-Net cannot read."""
        token_size = self.config.token_size
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            raise ValueError(f"tokens must be a (batch, num_tokens, {token_size}) tensor, got {describe(tokens)}")
        if tokens.shape[-1] != token_size:
            raise ValueError(
                f"tokens must have width {token_size} (the detokenizer's token_size), got {tokens.shape[-1]}"
            )
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must hold at least one image and one token, got shape {tuple(tokens.shape)}")
        if not isinstance(token_mask, torch.Tensor) or token_mask.shape != tokens.shape[:2]:
            raise ValueError(
                f"token_mask must be a {tuple(tokens.shape[:2])} tensor matching tokens, got {describe(token_mask)}"
            )
        if not token_mask.any(dim=1).all():
            raise ValueError("token_mask marks no real token for some image; every image needs at least one")

    def null_condition(self, batch_size: int, length: int) -> tuple[torch.Tensor, torch.BoolTensor]:
        """The null tokens for `batch_size` images, padded to `length` slots (at least `num_null_tokens`)."""
        num_null = self.config.num_null_tokens
        tokens = self.null_tokens[None].expand(batch_size, -1, -1)
        mask = torch.ones(batch_size, num_null, dtype=torch.bool, device=tokens.device)
        return pad_token_set(tokens, mask, length)

    def forward(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        drop_condition: torch.BoolTensor | None = None,
    ) -> tuple[torch.Tensor, torch.BoolTensor]:
        """Project `tokens` `(batch, num_tokens, token_size)`; images flagged in `drop_condition` get the null tokens.

        Returns `encoder_hidden_states` `(batch, length, cross_attention_dim)` and the full-length boolean
        `encoder_attention_mask` `(batch, length)` (diffusers would pad a shorter mask with "keep").
        """
        self.check_tokens(tokens, token_mask)
        token_mask = token_mask.bool()
        if drop_condition is not None and drop_condition.any():
            length = max(tokens.shape[1], self.config.num_null_tokens)
            tokens, token_mask = pad_token_set(tokens, token_mask, length)
            null_tokens, null_mask = self.null_condition(tokens.shape[0], length)
            tokens = torch.where(drop_condition[:, None, None], null_tokens.to(tokens.dtype), tokens)
            token_mask = torch.where(drop_condition[:, None], null_mask, token_mask)
        return self.projection(tokens), token_mask


class SetokDetokenizer(PreTrainedModel):
    """Token conditioning, a `UNet2DConditionModel` and an optional frozen `AutoencoderKL`; trains by denoising.

    Any model can own one (SeTok pretraining does, Setokim generation can); `SetokDetokenizerPipeline`
    samples images from it, and `SetokDetokenizerPipeline.from_detokenizer` exports it as a diffusers folder.
    """

    config: SetokDetokenizerConfig
    config_class = SetokDetokenizerConfig
    base_model_prefix = "detokenizer"
    main_input_name = "images"
    input_modalities = ("image",)

    def __init__(self, config: SetokDetokenizerConfig) -> None:
        super().__init__(config)
        self.conditioner = SetokTokenConditioner(
            config.token_size,
            config.cross_attention_dim,
            num_null_tokens=config.num_null_tokens,
            coordinate_channels=config.coordinate_channels,
            canvas_channels=config.canvas_channels,
        )
        self.unet = UNet2DConditionModel.from_config(config.unet_config)
        use_token_set_attention(self.unet)
        self.vae = AutoencoderKL.from_config(config.vae_config) if config.vae_config is not None else None
        if self.vae is not None:
            self.vae.requires_grad_(False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """diffusers' own initialisation (PyTorch's layer defaults) and small random null tokens."""
        if isinstance(module, SetokTokenConditioner):
            init.normal_(module.null_tokens, std=self.config.initializer_range)
        elif hasattr(module, "reset_parameters") and next(module.parameters(recurse=False), None) is not None:
            module.reset_parameters()

    @cached_property
    def noise_scheduler(self) -> DDPMScheduler:
        """The training noise schedule (built on first use: schedules are tensors, not parameters)."""
        return DDPMScheduler.from_config(self.config.scheduler_config)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Side of the square images it draws, in pixels."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in `[-1, 1]` -> what the U-Net denoises: scaled VAE latents, or the pixels themselves."""
        expected = (self.vae.config.in_channels if self.vae is not None else self.unet.config.out_channels,)
        expected += (self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must be a (batch, {', '.join(map(str, expected))}) tensor, got {describe(images)}"
            )
        if self.vae is None:
            return images
        with torch.no_grad():
            return self.vae.encode(images).latent_dist.sample() * self.vae.config.scaling_factor

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        noise: torch.Tensor | None = None,
        timesteps: torch.LongTensor | None = None,
    ) -> SetokDetokenizerOutput:
        """Denoising loss of redrawing `images` (`[-1, 1]`, the detokenizer's size) from their tokens.

        `noise` and `timesteps` are drawn at random unless given (give them for a low-variance validation loss).
        In training mode each image's tokens are swapped for the null tokens with `condition_drop_prob`.
        """
        self.conditioner.check_tokens(tokens, token_mask)
        latents = self.encode_images(images)
        batch_size = latents.shape[0]
        if tokens.shape[0] != batch_size:
            raise ValueError(f"tokens hold {tokens.shape[0]} images but images hold {batch_size}")
        scheduler = self.noise_scheduler
        if noise is None:
            noise = torch.randn_like(latents)
        if timesteps is None:
            timesteps = self.sample_timesteps(batch_size, latents.device)
        drop_condition = None
        if self.training and self.config.condition_drop_prob > 0:
            drop_condition = torch.rand(batch_size, device=latents.device) < self.config.condition_drop_prob

        hidden_states, attention_mask = self.conditioner(tokens, token_mask, drop_condition=drop_condition)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        model_output = self.conditioner.predict(self.unet, noisy, timesteps, hidden_states, attention_mask)
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        loss = nn.functional.mse_loss(model_output.float(), target.float())
        return SetokDetokenizerOutput(loss=loss, model_output=model_output, target=target)

    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.LongTensor:
        """Training timesteps, one per image, drawn as `config.timestep_sampling` says."""
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        config = self.config
        if config.timestep_sampling == "uniform":
            return torch.randint(0, num_timesteps, (batch_size,), device=device)
        logits = torch.randn(batch_size, device=device) * config.timestep_logit_std + config.timestep_logit_mean
        return (torch.sigmoid(logits) * num_timesteps).long().clamp(max=num_timesteps - 1)

    @classmethod
    def from_stable_diffusion(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        token_size: int,
        cross_attention_dim: int | None = None,
        output_loading_info: bool = False,
        **config_kwargs: Any,
    ) -> SetokDetokenizer | tuple[SetokDetokenizer, dict[str, list[str]]]:
        """A detokenizer that keeps a Stable-Diffusion-style folder's U-Net, VAE and noise schedule.

        The text encoder is replaced by the token projection. Cross-attention keeps its weights where its
        key/value width equals `cross_attention_dim` (the U-Net's own by default); the layers whose width
        differs, and any U-Net part that read text-encoder outputs outside cross-attention
        (`TEXT_CONDITIONING_SETTINGS`), start fresh. Which ones is logged, and returned with
        `output_loading_info=True` as `{"kept": parameter names, "reinitialized": layer names,
        "dropped": parameter names}`. `config_kwargs` go to `SetokDetokenizerConfig` (e.g. `num_null_tokens`).
        """
        unet = UNet2DConditionModel.from_pretrained(pretrained_model_name_or_path, subfolder="unet")
        try:
            vae = AutoencoderKL.from_pretrained(pretrained_model_name_or_path, subfolder="vae")
        except OSError:
            logger.info("%s has no vae/ folder: the detokenizer denoises pixels", pretrained_model_name_or_path)
            vae = None
        scheduler = DDPMScheduler.from_pretrained(pretrained_model_name_or_path, subfolder="scheduler")

        unet_config = public_config(unet.config)
        source_width = unet_config["cross_attention_dim"]
        if cross_attention_dim is None:
            widths = set(source_width) if isinstance(source_width, (list, tuple)) else {source_width}
            if len(widths) != 1:
                raise ValueError(
                    f"the U-Net's blocks use cross_attention_dim {source_width}; pass one cross_attention_dim"
                )
            cross_attention_dim = widths.pop()
        unet_config["cross_attention_dim"] = cross_attention_dim
        for setting in TEXT_CONDITIONING_SETTINGS:
            unet_config[setting] = None

        config = SetokDetokenizerConfig(
            token_size=token_size,
            unet_config=unet_config,
            vae_config=public_config(vae.config) if vae is not None else None,
            scheduler_config=public_config(scheduler.config),
            **config_kwargs,
        )
        detokenizer = cls(config)
        fresh, pretrained = detokenizer.unet.state_dict(), unet.state_dict()
        kept = {
            name: value for name, value in pretrained.items() if name in fresh and fresh[name].shape == value.shape
        }
        detokenizer.unet.load_state_dict(kept, strict=False)
        if vae is not None:
            detokenizer.vae.load_state_dict(vae.state_dict())
        loading_info = {
            "kept": sorted(kept),
            "reinitialized": sorted({name.rsplit(".", 1)[0] for name in fresh if name not in kept}),
            "dropped": sorted(name for name in pretrained if name not in kept),
        }
        if loading_info["reinitialized"]:
            logger.warning(
                "SetokDetokenizer.from_stable_diffusion re-initialised %d U-Net layers (cross-attention width "
                "%s -> %s, or text-only parts): %s",
                len(loading_info["reinitialized"]),
                source_width,
                cross_attention_dim,
                ", ".join(loading_info["reinitialized"]),
            )
        return (detokenizer, loading_info) if output_loading_info else detokenizer


def public_config(config: Any) -> dict[str, Any]:
    """A diffusers config as a plain dict, without its private (`_`-prefixed) bookkeeping entries."""
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def describe(value: Any) -> str:
    """`shape (2, 3)` for tensors, the type name otherwise: for error messages."""
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


__all__ = ["SetokDetokenizer", "SetokDetokenizerOutput", "SetokTokenConditioner"]
