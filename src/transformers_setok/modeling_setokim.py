"""Setokim: SeTok tokens between `[Img]` and `[/Img]` inside any causal language model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerateOutput
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .configuration_setok import SetokConfig
from .configuration_setokim import SetokimConfig
from .image_processing_setok import SetokImageProcessor
from .model_card import write_model_card
from .modeling_setok import SetokModel, SetokModelOutput, check_pixel_values
from .placeholder_expansion import (
    ExpandedInputs,
    check_placeholder_count,
    expand_image_placeholders,
    pack_image_embeds,
)
from .processing_setokim import SetokimProcessor


@dataclass
class SetokimImageFeatures(ModelOutput):
    """Images as the language model sees them.

    Attributes:
        image_embeds: `(num_images, max_tokens, text_hidden_size)` projected tokens; padding slots are meaningless.
        token_mask: `(num_images, max_tokens)` which slots hold a real token.
        num_tokens: `(num_images,)` tokens per image.
        tokenizer_output: the SeTok output (assignment, scores, patch features) the tokens came from.
    """

    image_embeds: torch.FloatTensor | None = None
    token_mask: torch.BoolTensor | None = None
    num_tokens: torch.LongTensor | None = None
    tokenizer_output: SetokModelOutput | None = None


@dataclass
class SetokimMultimodalInputs(ModelOutput):
    """Text inputs with every image placeholder expanded, and the image embeddings that fill them.

    Attributes:
        input_ids, attention_mask, position_ids, labels: the expanded sequence (labels `-100` on image positions).
        image_embeds: `(batch, max image tokens per row, text_hidden_size)` each row's image tokens in order.
        image_features: what [`SetokimModel.get_image_features`] returned.
    """

    input_ids: torch.LongTensor | None = None
    attention_mask: torch.LongTensor | None = None
    position_ids: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    image_features: SetokimImageFeatures | None = None


@dataclass
class SetokimModelOutputWithPast(BaseModelOutputWithPast):
    """Language-model hidden states over the expanded sequence.

    Attributes:
        attention_mask: `(batch, expanded_length)` mask of the expanded sequence the states align with.
        labels: expanded labels when labels were given (`-100` on image and padding positions).
        image_features: the images' tokens, when `pixel_values` were given.
    """

    attention_mask: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    image_features: SetokimImageFeatures | None = None


@dataclass
class SetokimCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Logits over the expanded sequence; `loss` covers text targets only.

    Attributes:
        attention_mask: `(batch, expanded_length)` mask of the expanded sequence the logits align with.
        labels: expanded labels when labels were given (`-100` on image and padding positions).
        image_features: the images' tokens, when `pixel_values` were given.
    """

    attention_mask: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    image_features: SetokimImageFeatures | None = None


class SetokimProjector(nn.Sequential):
    """`linear` or `mlp{N}x_gelu`: token width -> LLM width (the LLaVA projector shapes)."""

    def __init__(self, config: SetokimConfig) -> None:
        token_size, text_size = config.setok_config.token_size, config.text_config.hidden_size
        layers: list[nn.Module] = [nn.Linear(token_size, text_size)]
        for _ in range(config.projector_depth - 1):
            layers += [nn.GELU(), nn.Linear(text_size, text_size)]
        super().__init__(*layers)


class SetokimPreTrainedModel(PreTrainedModel):
    config: SetokimConfig
    config_class = SetokimConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["SetokAttentionLayer"]

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save as Transformers does, then add a model card unless the folder has one."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_model_card(save_directory, self.config)


class SetokimModel(SetokimPreTrainedModel):
    """SeTok tokenizer, projector and the language model's base (no LM head).

    The vision encoder starts frozen, as in the paper; `training.set_trainable` chooses what trains.
    """

    def __init__(self, config: SetokimConfig) -> None:
        super().__init__(config)
        self.setok = SetokModel(config.setok_config)
        self.setok.vision_model.requires_grad_(False)
        self.multi_modal_projector = SetokimProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.FloatTensor) -> SetokimImageFeatures:
        """Tokenize images with SeTok and project the tokens to the language model's width."""
        tokenizer_output = self.setok(pixel_values)
        return SetokimImageFeatures(
            image_embeds=self.multi_modal_projector(tokenizer_output.tokens),
            token_mask=tokenizer_output.token_mask,
            num_tokens=tokenizer_output.num_tokens,
            tokenizer_output=tokenizer_output,
        )

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        padding_side: str | None = None,
    ) -> SetokimMultimodalInputs:
        """Tokenize the images, then expand each placeholder to its image's tokens (shared by forward and generate)."""
        if input_ids is None:
            raise ValueError("pixel_values need input_ids holding one image placeholder per image")
        check_pixel_values(pixel_values, self.config.setok_config.vision_config.num_channels)
        image_token_id = self.config.image_token_id
        check_placeholder_count(input_ids, image_token_id, len(pixel_values))  # before the encoder runs
        features = self.get_image_features(pixel_values)
        pad_token_id = self.config.text_config.pad_token_id
        expanded: ExpandedInputs = expand_image_placeholders(
            input_ids,
            attention_mask,
            features.num_tokens,
            image_token_id,
            pad_token_id if pad_token_id is not None else 0,
            labels=labels,
            padding_side=padding_side,
        )
        image_rows = (input_ids == image_token_id).nonzero()[:, 0]
        return SetokimMultimodalInputs(
            input_ids=expanded.input_ids,
            attention_mask=expanded.attention_mask,
            position_ids=expanded.position_ids,
            labels=expanded.labels,
            image_embeds=pack_image_embeds(features.image_embeds, features.token_mask, image_rows, len(input_ids)),
            image_features=features,
        )

    def embed_with_images(self, input_ids: torch.LongTensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with every image position filled from `image_embeds`, row by row in order."""
        is_image = input_ids == self.config.image_token_id
        inputs_embeds = self.get_input_embeddings()(input_ids)
        if not bool(is_image.any()):
            return inputs_embeds
        if image_embeds is None:
            raise ValueError(
                f"input_ids hold {int(is_image.sum())} image positions but no pixel_values were given; "
                "pass the images the placeholders stand for"
            )
        per_row = is_image.sum(dim=1)
        if (
            image_embeds.dim() != 3
            or image_embeds.shape[0] != len(input_ids)
            or int(per_row.max()) > image_embeds.shape[1]
        ):
            raise ValueError(
                f"image_embeds of shape {tuple(image_embeds.shape)} cannot fill {per_row.tolist()} image positions "
                "per row"
            )
        filled = torch.arange(image_embeds.shape[1], device=input_ids.device)[None, :] < per_row[:, None]
        return inputs_embeds.masked_scatter(is_image[..., None], image_embeds[filled].to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> SetokimModelOutputWithPast:
        """Run the language model over text with images.

        With `pixel_values`, `input_ids` hold one placeholder per image (as the processor writes them) and are
        expanded here; `labels`, if given, are expanded alongside and returned. Without them, `input_ids` may
        already be expanded, with `image_embeds` (from `prepare_multimodal_inputs`) filling the image positions.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        image_features = None
        if pixel_values is not None:
            if image_embeds is not None or inputs_embeds is not None or position_ids is not None:
                raise ValueError(
                    "pixel_values expand the sequence, so image_embeds, inputs_embeds and position_ids cannot be "
                    "given with them"
                )
            prepared = self.prepare_multimodal_inputs(input_ids, pixel_values, attention_mask, labels)
            input_ids, attention_mask, position_ids = (
                prepared.input_ids,
                prepared.attention_mask,
                prepared.position_ids,
            )
            labels, image_embeds, image_features = prepared.labels, prepared.image_embeds, prepared.image_features
        if inputs_embeds is None:
            inputs_embeds = self.embed_with_images(input_ids, image_embeds)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        return SetokimModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            attention_mask=attention_mask,
            labels=labels,
            image_features=image_features,
        )


class SetokimForConditionalGeneration(SetokimPreTrainedModel, GenerationMixin):
    """Setokim with a language-modelling head: answers about images with `generate()`, trains with `Trainer`."""

    def __init__(self, config: SetokimConfig) -> None:
        super().__init__(config)
        self.model = SetokimModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # so a saved folder serves `AutoModel` (the base model) through `trust_remote_code` as well
        module = SetokimModel.__module__.rsplit(".", 1)[-1]
        config.auto_map = {**(getattr(config, "auto_map", None) or {}), "AutoModel": f"{module}.SetokimModel"}
        if config.tie_word_embeddings:
            embeddings = self.model.get_input_embeddings()
            name = next(n for n, m in self.model.language_model.named_modules() if m is embeddings)
            self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{name}.weight"}
        self.post_init()

    @classmethod
    def from_parts(
        cls,
        vision: str | PreTrainedModel,
        language_model: str | PreTrainedModel,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        projector_type: str = "mlp2x_gelu",
        dtype: torch.dtype | None = None,
        **setok_kwargs: Any,
    ) -> tuple[SetokimForConditionalGeneration, SetokimProcessor]:
        """A Setokim assembled from pretrained parts, ready for training, and the processor that goes with it.

        Args:
            vision: a SeTok tokenizer (`SetokModel` or its folder), or any vision encoder (a model or folder; the
                vision tower of a CLIP/SigLIP dual encoder is taken) around which a fresh merger is built.
            language_model: any causal LM (a model or folder / Hub id).
            tokenizer: its tokenizer; loaded from `language_model` when that is a path.
            projector_type: `"linear"` or `"mlp{N}x_gelu"`.
            dtype: the composed model's dtype (the parts' own dtypes by default: float32 unless they differ).
            setok_kwargs: `SetokConfig` settings (threshold, budget, merger sizes) for a fresh SeTok.

        `[Img]`, `[/Img]` and `<image>` are added to the tokenizer; their embeddings start at the mean of the
        existing ones, so they begin as neutral as an embedding can be.
        """
        setok = load_setok(vision, **setok_kwargs)
        if isinstance(language_model, str):
            tokenizer = tokenizer if tokenizer is not None else language_model
            language_model = AutoModelForCausalLM.from_pretrained(language_model)
        if tokenizer is None:
            raise ValueError("tokenizer is required when language_model is a model rather than a path")
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        processor = SetokimProcessor(SetokImageProcessor.for_encoder(setok.config.vision_config), tokenizer)
        resize_embeddings_to_mean(language_model, len(tokenizer))

        text_config = language_model.config
        if text_config.pad_token_id is None:
            text_config.pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )
        config = SetokimConfig(
            setok_config=setok.config,
            text_config=text_config,
            projector_type=projector_type,
            image_token_id=processor.image_token_id,
            image_start_token_id=processor.image_start_token_id,
            image_end_token_id=processor.image_end_token_id,
            tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        )
        # the parts' configs carry the dtypes of their source checkpoints; the composed model has one dtype
        for part in (config.setok_config, config.setok_config.vision_config, config.text_config):
            part.dtype = None
        model = cls._from_config(config, dtype=dtype) if dtype is not None else cls(config)
        model.model.setok.load_state_dict(setok.state_dict())
        model.model.language_model.load_state_dict(language_model.get_decoder().state_dict())
        model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
        return model.eval(), processor

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.FloatTensor) -> SetokimImageFeatures:
        return self.model.get_image_features(pixel_values)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> SetokimCausalLMOutputWithPast:
        """Logits over the expanded sequence, and the next-token loss on text targets when `labels` are given.

        `labels` align with the caller's `input_ids`; image positions never count in the loss.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            image_embeds=image_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if outputs.labels is not None:
            loss = self.loss_function(logits, outputs.labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return SetokimCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            attention_mask=outputs.attention_mask,
            labels=outputs.labels,
            image_features=outputs.image_features,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> GenerateOutput | torch.LongTensor:
        """Expand the image placeholders, then run the standard `GenerationMixin.generate`.

        Every decoding strategy, streamer and cache works unchanged. The returned sequences are the caller's
        `input_ids` followed by the new tokens, so `out[:, inputs["input_ids"].shape[1]:]` is the answer.
        """
        if pixel_values is None:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        prepared = self.model.prepare_multimodal_inputs(input_ids, pixel_values, attention_mask, padding_side="left")
        output = super().generate(
            input_ids=prepared.input_ids,
            attention_mask=prepared.attention_mask,
            image_embeds=prepared.image_embeds,
            **kwargs,
        )
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        new_tokens = sequences[:, prepared.input_ids.shape[1] :]
        prompt = input_ids.repeat_interleave(len(sequences) // len(input_ids), dim=0)
        sequences = torch.cat([prompt.to(new_tokens.device), new_tokens], dim=1)
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output


def load_setok(vision: str | PreTrainedModel, **setok_kwargs: Any) -> SetokModel:
    """A SeTok tokenizer as given, or a fresh one around a pretrained vision encoder."""
    not_a_setokim = "vision must be a SeTok tokenizer or a vision encoder, not a whole Setokim"
    if isinstance(vision, str):
        model_type = AutoConfig.from_pretrained(vision).model_type
        if model_type == SetokimConfig.model_type:
            raise ValueError(not_a_setokim)
        is_setok = model_type == SetokConfig.model_type
        vision = SetokModel.from_pretrained(vision) if is_setok else AutoModel.from_pretrained(vision)
    if isinstance(vision, SetokimPreTrainedModel):
        raise ValueError(not_a_setokim)
    if isinstance(vision, SetokModel):
        if setok_kwargs:
            raise ValueError(
                f"{sorted(setok_kwargs)} configure a fresh SeTok; a pretrained SetokModel keeps its config"
            )
        return vision
    if hasattr(vision.config, "vision_config"):  # a CLIP/SigLIP-style dual encoder: keep its vision tower
        vision = vision.vision_model
    setok = SetokModel(SetokConfig(vision_config=vision.config, **setok_kwargs))
    setok.vision_model.load_state_dict(vision.state_dict())
    return setok


def resize_embeddings_to_mean(language_model: PreTrainedModel, vocab_size: int) -> None:
    """Grow the input (and untied output) embeddings to `vocab_size`, new rows set to the mean of the old ones."""
    old_size = language_model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old_size:
        return
    language_model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for embeddings in {language_model.get_input_embeddings(), language_model.get_output_embeddings()} - {None}:
            embeddings.weight[old_size:] = embeddings.weight[:old_size].mean(dim=0)


__all__ = [
    "SetokimCausalLMOutputWithPast",
    "SetokimForConditionalGeneration",
    "SetokimImageFeatures",
    "SetokimModel",
    "SetokimModelOutputWithPast",
    "SetokimPreTrainedModel",
]
