"""Configuration of the SeTok detokenizer: a diffusers U-Net that redraws an image from its SeTok tokens."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

DEFAULT_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [64, 128, 256],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 512,
    "attention_head_dim": 8,
}
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
}


@strict
class SetokDetokenizerConfig(PreTrainedConfig):
    r"""Configuration of [`SetokDetokenizer`]: token conditioning, a `UNet2DConditionModel`, an optional VAE.

    The diffusers parts are kept as their own config dicts (what `UNet2DConditionModel.from_config`,
    `AutoencoderKL.from_config` and `DDPMScheduler.from_config` take), so a detokenizer can start from any
    diffusers U-Net and the exported pipeline's components are plain diffusers models.

    Args:
        token_size (`int`, *optional*, defaults to 4096):
            Width of the SeTok tokens it reads (the tokenizer's `token_size`).
        unet_config (`dict`, *optional*):
            `UNet2DConditionModel` config; a small 64x64 pixel-space U-Net by default. Its `cross_attention_dim`
            is the width the tokens are projected to.
        vae_config (`dict`, *optional*):
            `AutoencoderKL` config to denoise in its latent space (as Stable Diffusion does); `None` denoises pixels.
        scheduler_config (`dict`, *optional*):
            `DDPMScheduler` config of the training noise schedule (its `prediction_type` sets the loss target);
            sampling schedulers (DDIM, DPM-Solver) are built from it. Its `timestep_spacing` is `"trailing"`
            unless set: a sampler's first step is then the last training timestep, the one whose input is the
            pure noise it starts from ("leading" would start a stride early, where the U-Net expects some image).
        num_null_tokens (`int`, *optional*, defaults to 1):
            Learned tokens that stand for "no image" in classifier-free guidance.
        condition_drop_prob (`float`, *optional*, defaults to 0.1):
            Probability, per training image, of replacing its tokens with the null tokens.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the null tokens at initialisation.
        coordinate_channels (`int`, *optional*, defaults to 0):
            Give the U-Net this many more input channels, a Fourier code of each pixel's position (a multiple of
            4: sine and cosine of `x` and `y` per frequency), so it can put a token's region where the token says
            it lies; `unet_config["in_channels"]` must then be the sample's channels plus these.
        canvas_channels (`int`, *optional*, defaults to 0):
            Give the U-Net this many more input channels, the token set painted onto the pixels: each pixel mixes
            learned values of the tokens by a softmax over them of a match between token and position code (needs
            `coordinate_channels`), so the U-Net reads which token owns which pixels from its first convolution;
            `unet_config["in_channels"]` counts these too.
        timestep_sampling (`str`, *optional*, defaults to `"uniform"`):
            How training draws each image's diffusion timestep: `"uniform"` over all of them, or `"logit_normal"`
            (as Stable Diffusion 3 trains: `t / T = sigmoid(N(timestep_logit_mean, timestep_logit_std))`). A
            positive mean favours high noise, where the noisy image shows little and the tokens must say the rest.
        timestep_logit_mean (`float`, *optional*, defaults to 0.0):
            Mean of the logit-normal timestep distribution.
        timestep_logit_std (`float`, *optional*, defaults to 1.0):
            Standard deviation of the logit-normal timestep distribution.
    """

    model_type = "setok_detokenizer"

    token_size: int = 4096
    unet_config: dict | None = None
    vae_config: dict | None = None
    scheduler_config: dict | None = None
    num_null_tokens: int = 1
    condition_drop_prob: float = 0.1
    initializer_range: float = 0.02
    coordinate_channels: int = 0
    canvas_channels: int = 0
    timestep_sampling: str = "uniform"
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.unet_config = {**DEFAULT_UNET_CONFIG, **(self.unet_config or {})}
        self.scheduler_config = {**DEFAULT_SCHEDULER_CONFIG, **(self.scheduler_config or {})}

    def validate_detokenizer(self) -> None:
        """Reject settings the detokenizer cannot be built with, naming the argument."""
        if self.token_size < 1:
            raise ValueError(f"token_size must be >= 1, got {self.token_size}")
        if self.num_null_tokens < 1:
            raise ValueError(f"num_null_tokens must be >= 1, got {self.num_null_tokens}")
        if not 0.0 <= self.condition_drop_prob <= 1.0:
            raise ValueError(f"condition_drop_prob must be in [0, 1], got {self.condition_drop_prob}")
        if not isinstance(self.unet_config.get("cross_attention_dim"), int):
            raise ValueError(
                "unet_config['cross_attention_dim'] must be one int (the width the tokens are projected to), "
                f"got {self.unet_config.get('cross_attention_dim')!r}"
            )
        channels = self.unet_config["out_channels"]
        if self.vae_config is not None:
            channels = self.vae_config.get("latent_channels", 4)
            if self.unet_config["out_channels"] != channels:
                raise ValueError(
                    f"unet_config['out_channels'] ({self.unet_config['out_channels']}) must equal the VAE's "
                    f"latent_channels ({channels})"
                )
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {self.timestep_sampling!r}")
        if not self.timestep_logit_std > 0:
            raise ValueError(f"timestep_logit_std must be > 0, got {self.timestep_logit_std}")
        if self.coordinate_channels < 0 or self.coordinate_channels % 4:
            raise ValueError(f"coordinate_channels must be a multiple of 4, got {self.coordinate_channels}")
        if self.canvas_channels < 0 or (self.canvas_channels and not self.coordinate_channels):
            raise ValueError(
                f"canvas_channels must be >= 0 and needs coordinate_channels (the canvas places tokens by that "
                f"code), got {self.canvas_channels} with coordinate_channels={self.coordinate_channels}"
            )
        expected = channels + self.coordinate_channels + self.canvas_channels
        if self.unet_config["in_channels"] != expected:
            raise ValueError(
                f"unet_config['in_channels'] ({self.unet_config['in_channels']}) must be {expected}: the sample's "
                f"{channels} channels, the {self.coordinate_channels} coordinate channels and the "
                f"{self.canvas_channels} canvas channels"
            )

    @property
    def cross_attention_dim(self) -> int:
        return self.unet_config["cross_attention_dim"]


__all__ = ["SetokDetokenizerConfig"]
