"""`SetokDetokenizerPipeline`: SeTok tokens in, images out, as a diffusers `DiffusionPipeline`."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .modeling_setok_detokenizer import (
    SetokDetokenizer,
    SetokTokenConditioner,
    describe,
    pad_token_set,
    use_token_set_attention,
)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class SetokDetokenizerPipelineOutput(BaseOutput):
    """Images drawn from tokens: a list of PIL images, a `(batch, height, width, 3)` array or a
    `(batch, 3, height, width)` tensor in `[0, 1]`, or the final latents for `output_type="latent"`."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class SetokDetokenizerPipeline(DiffusionPipeline):
    r"""Draws images from SeTok tokens with a token-conditioned `UNet2DConditionModel`.

    Components: `unet`, `conditioner` ([`SetokTokenConditioner`]: token projection and null tokens), `scheduler`
    (any diffusers sampler; DDIM when exported from a detokenizer) and an optional `vae` (`None` in pixel space).
    Saved folders hold one sub-folder per component, each loadable alone with its own class.
    """

    model_cpu_offload_seq = "conditioner->unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet: UNet2DConditionModel,
        conditioner: SetokTokenConditioner,
        scheduler: KarrasDiffusionSchedulers,
        vae: AutoencoderKL | None = None,
    ) -> None:
        super().__init__()
        use_token_set_attention(unet)
        self.register_modules(unet=unet, conditioner=conditioner, scheduler=scheduler, vae=vae)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_detokenizer(
        cls, detokenizer: SetokDetokenizer, scheduler: SchedulerMixin | None = None
    ) -> SetokDetokenizerPipeline:
        """The pipeline over a [`SetokDetokenizer`]'s modules (shared, not copied).

        `scheduler` defaults to DDIM on the detokenizer's training noise schedule; pass e.g.
        `DPMSolverMultistepScheduler.from_config(detokenizer.config.scheduler_config)` for DPM-Solver.
        """
        if scheduler is None:
            scheduler = DDIMScheduler.from_config(detokenizer.config.scheduler_config)
        return cls(
            unet=detokenizer.unet, conditioner=detokenizer.conditioner, scheduler=scheduler, vae=detokenizer.vae
        )

    def check_inputs(
        self,
        num_inference_steps: int,
        guidance_scale: float,
        output_type: str,
        latents: torch.Tensor | None,
        latent_shape: tuple[int, ...],
    ) -> None:
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if not guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 means no guidance), got {guidance_scale}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if latents is not None and tuple(latents.shape) != latent_shape:
            raise ValueError(f"latents must have shape {latent_shape}, got {describe(latents)}")

    def denoise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        hidden_states: torch.Tensor,
        attention_mask: torch.BoolTensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The U-Net's prediction; with guidance, the conditional and unconditional halves in one batched call."""
        if guidance_scale > 1.0:
            latents = torch.cat([latents, latents])
        model_input = self.scheduler.scale_model_input(latents, timestep)
        prediction = self.conditioner.predict(self.unet, model_input, timestep, hidden_states, attention_mask)
        if guidance_scale > 1.0:
            conditional, unconditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        return prediction

    @torch.no_grad()
    def __call__(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> SetokDetokenizerPipelineOutput | tuple:
        r"""Draw one image per row of `tokens`.

        Args:
            tokens: `(batch, num_tokens, token_size)` SeTok tokens, padded (`SetokModelOutput.tokens`).
            token_mask: `(batch, num_tokens)` which slots hold a real token; all of them when `None`.
            num_inference_steps: sampler steps.
            guidance_scale: classifier-free guidance weight; 1 turns guidance off (one U-Net pass per step).
            generator: a generator, or one per image (an image then gets the same noise in any batch).
            latents: starting noise `(batch, channels, height, width)`, drawn from `generator` when `None`.
            output_type: `"pil"`, `"np"`, `"pt"`, or `"latent"` for the denoised latents (before the VAE).
            return_dict: return a [`SetokDetokenizerPipelineOutput`] rather than a tuple.
        """
        if token_mask is None and isinstance(tokens, torch.Tensor):
            token_mask = torch.ones(tokens.shape[:-1], dtype=torch.bool, device=tokens.device)
        self.conditioner.check_tokens(tokens, token_mask)
        batch_size = tokens.shape[0]
        size = self.unet.config.sample_size
        latent_shape = (batch_size, self.unet.config.out_channels, size, size)
        self.check_inputs(num_inference_steps, guidance_scale, output_type, latents, latent_shape)

        device = self._execution_device
        dtype = self.unet.dtype
        tokens, token_mask = tokens.to(device, dtype), token_mask.to(device).bool()
        if guidance_scale > 1.0:
            length = max(tokens.shape[1], self.conditioner.config.num_null_tokens)
            null_tokens, null_mask = self.conditioner.null_condition(batch_size, length)
            tokens, token_mask = pad_token_set(tokens, token_mask, length)
            tokens, token_mask = torch.cat([tokens, null_tokens.to(dtype)]), torch.cat([token_mask, null_mask])
        hidden_states, attention_mask = self.conditioner(tokens, token_mask)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma
        step_kwargs = {"generator": generator} if accepts(self.scheduler.step, "generator") else {}
        for timestep in self.progress_bar(self.scheduler.timesteps):
            prediction = self.denoise(latents, timestep, hidden_states, attention_mask, guidance_scale)
            latents = self.scheduler.step(prediction, timestep, latents, **step_kwargs).prev_sample

        if output_type == "latent":
            images = latents
        else:
            if self.vae is not None:
                latents = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            images = self.image_processor.postprocess(latents, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return SetokDetokenizerPipelineOutput(images=images)


def accepts(function: object, argument: str) -> bool:
    """Whether `function` takes `argument` (schedulers differ in whether `step` takes a generator)."""
    return argument in inspect.signature(function).parameters


__all__ = ["SetokDetokenizerPipeline", "SetokDetokenizerPipelineOutput"]
