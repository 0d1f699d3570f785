"""SeTok stage-1 pretraining: tokens must redraw their image (denoising) and match its concepts (contrastive)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .concept_contrastive import SetokConceptHead
from .configuration_setok_pretraining import SetokForPreTrainingConfig
from .modeling_setok import NativePartsInitialization, SetokModel, SetokModelOutput
from .modeling_setok_detokenizer import SetokDetokenizer


@dataclass
class SetokForPreTrainingOutput(ModelOutput):
    """Stage-1 losses and the tokens they were computed from.

    Attributes:
        loss: weighted sum of `reconstruction_loss` and `contrastive_loss` (the latter when phrases were given).
        reconstruction_loss: the detokenizer's denoising loss conditioned on the tokens.
        contrastive_loss: concept-level multi-label InfoNCE over the (global) batch; `None` without phrases.
        layout_loss: cross-entropy of the token canvas against the tokens' clusters; `None` when its weight is 0.
        tokens: `(batch, max_tokens, token_size)` the images' tokens; `token_mask` marks the real ones.
        num_tokens: `(batch,)` tokens per image.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    layout_loss: torch.FloatTensor | None = None
    tokens: torch.FloatTensor | None = None
    token_mask: torch.BoolTensor | None = None
    num_tokens: torch.LongTensor | None = None


class SetokForPreTraining(NativePartsInitialization, PreTrainedModel):
    """The SeTok tokenizer trained with its detokenizer and a concept head, as one `Trainer`-ready checkpoint.

    The detokenizer is an ordinary submodule built from `config.detokenizer_config`, so one `from_pretrained`
    loads all three parts; `SetokDetokenizerPipeline.from_detokenizer(model.detokenizer)` renders tokens and
    saves the diffusers folder, and `model.setok.save_pretrained(...)` exports the trained tokenizer alone.
    """

    config: SetokForPreTrainingConfig
    config_class = SetokForPreTrainingConfig
    base_model_prefix = "setok"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")

    def __init__(self, config: SetokForPreTrainingConfig) -> None:
        super().__init__(config)
        self.setok = SetokModel(config.setok_config)
        self.detokenizer = SetokDetokenizer(config.detokenizer_config)
        self.concept_head = SetokConceptHead(
            config.text_config,
            config.setok_config.token_size,
            config.logit_scale_init_value,
            freeze_text_model=config.freeze_text_model,
        )
        if config.freeze_vision_model:
            self.setok.vision_model.requires_grad_(False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Xavier-uniform phrase projection, CLIP's initial temperature; the parts initialise themselves."""
        if isinstance(module, SetokConceptHead):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)

    def train(self, mode: bool = True) -> SetokForPreTraining:
        """Train mode for what trains; a frozen vision encoder stays in eval mode (the concept head keeps its
        frozen text model in eval mode itself)."""
        super().train(mode)
        if self.config.freeze_vision_model:
            self.setok.vision_model.eval()
        return self

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        concept_input_ids: torch.LongTensor | None = None,
        concept_attention_mask: torch.Tensor | None = None,
        labels: torch.FloatTensor | None = None,
        noise: torch.FloatTensor | None = None,
        timesteps: torch.LongTensor | None = None,
    ) -> SetokForPreTrainingOutput:
        r"""Tokenize `pixel_values`, then score how well the tokens redraw the images and name their concepts.

        Args:
            pixel_values: `(batch, 3, height, width)` tokenizer inputs.
            concept_input_ids: `(batch, num_phrases, length)` each image's phrases, tokenized for the text model
                (`(batch, length)` means one phrase per image); phrase slots whose mask is all zero are padding.
            concept_attention_mask: the phrases' attention mask, same shape; all ones when `None`.
            labels: `(batch, 3, size, size)` images in `[-1, 1]` to redraw at the detokenizer's size; by default
                `pixel_values` resized (right for `SetokImageProcessor`'s SigLIP normalisation, which maps to
                `[-1, 1]`).
            noise, timesteps: fixed diffusion noise and timesteps (random when `None`), for a repeatable loss.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vision_model):
            patch_features, grid_size = self.setok.get_patch_features(pixel_values)
        tokenized = self.setok.tokenize_features(patch_features, grid_size)

        if labels is None:
            size = self.detokenizer.image_size
            labels = pixel_values
            if pixel_values.shape[-2:] != (size, size):
                labels = nn.functional.interpolate(pixel_values, size=(size, size), mode="bilinear", antialias=True)
        reconstruction_loss = self.detokenizer(
            labels, tokenized.tokens, tokenized.token_mask, noise=noise, timesteps=timesteps
        ).loss
        loss = self.config.reconstruction_loss_weight * reconstruction_loss

        layout_loss = None
        if self.config.layout_loss_weight:
            layout_loss = self.layout_loss(labels, tokenized)
            loss = loss + self.config.layout_loss_weight * layout_loss

        contrastive_loss = None
        if concept_input_ids is not None:
            concept_input_ids, concept_attention_mask = check_concepts(
                concept_input_ids, concept_attention_mask, pixel_values.shape[0]
            )
            contrastive_loss = self.concept_head(
                tokenized.tokens, tokenized.token_mask, concept_input_ids, concept_attention_mask
            )
            loss = loss + self.config.contrastive_loss_weight * contrastive_loss

        return SetokForPreTrainingOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            contrastive_loss=contrastive_loss,
            layout_loss=layout_loss,
            tokens=tokenized.tokens,
            token_mask=tokenized.token_mask,
            num_tokens=tokenized.num_tokens,
        )

    def layout_loss(self, images: torch.Tensor, tokenized: SetokModelOutput) -> torch.Tensor:
        """Mean over clustered patches of `-log` the share the canvas gives the patch's own token there (the
        canvas's pixel shares averaged over each patch's pixels)."""
        conditioner = self.detokenizer.conditioner
        hidden_states, attention_mask = conditioner(tokenized.tokens, tokenized.token_mask)
        shares = conditioner.canvas_weights(conditioner.coordinate_code(images), hidden_states, attention_mask)
        patch_shares = nn.functional.adaptive_avg_pool2d(shares, tokenized.grid_size).flatten(2)
        assignment = tokenized.assignment
        clustered = assignment >= 0
        own = patch_shares.gather(1, assignment.clamp(min=0)[:, None])[:, 0]
        return -(own.clamp(min=1e-6).log() * clustered).sum() / clustered.sum().clamp(min=1)


def check_concepts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Phrases as `(batch, num_phrases, length)` ids and mask; a `ValueError` naming the argument otherwise."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (2, 3):
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"concept_input_ids must be (batch, num_phrases, length) or (batch, length), got {shape}")
    if input_ids.dim() == 2:
        input_ids = input_ids[:, None]
        attention_mask = attention_mask[:, None] if attention_mask is not None else None
    if input_ids.shape[0] != batch_size:
        raise ValueError(
            f"concept_input_ids holds phrases for {input_ids.shape[0]} images but pixel_values holds {batch_size}"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"concept_attention_mask must match concept_input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    return input_ids, attention_mask


__all__ = ["SetokForPreTraining", "SetokForPreTrainingOutput"]
