"""Setokim: SeTok tokens between `[Img]` and `[/Img]` inside any causal language model."""

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
from transformers.generation import BaseStreamer, LogitsProcessor, LogitsProcessorList
from transformers.generation.utils import GenerateOutput
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_setok import SetokConfig
from .configuration_setokim import SetokimConfig
from .generation_setokim import (
    SetokimImageGenerationOutput,
    SetokimVisionHead,
    WrittenVisionTokens,
    check_generation_setup,
    image_regression_loss,
    left_pad,
    prompts_opening_an_image,
    text_stops,
    write_vision_tokens,
    written_sequences,
)
from .image_processing_setok import SetokImageProcessor
from .model_card import write_model_card
from .modeling_mask_decoder import (
    SetokimMaskDecoder,
    SetokimSegmentationOutput,
    mask_loss,
    region_images,
)
from .modeling_setok import NativePartsInitialization, SetokModel, SetokModelOutput, check_pixel_values
from .modeling_setok_detokenizer import SetokDetokenizer
from .pipeline_setok_detokenizer import SetokDetokenizerPipeline
from .placeholder_expansion import (
    IGNORE_INDEX,
    ExpandedInputs,
    check_placeholder_count,
    drop_leading_image_embeds,
    expand_image_placeholders,
    pack_image_embeds,
    pack_rows,
)
from .processing_setokim import SetokimProcessor
from .token_reduction import TokenReductionOutput, check_keep, prompt_aware_token_reduction

logger = logging.get_logger(__name__)


@dataclass
class SetokimImageFeatures(BaseModelOutputWithPooling):
    """Images as the language model sees them, in the shape of Transformers' `get_image_features` outputs.

    Attributes:
        last_hidden_state: `(num_images, num_patches, vision_hidden_size)` encoder features the tokens were built
            from.
        pooler_output: one `(num_tokens_i, text_hidden_size)` tensor per image: its projected tokens, unpadded.
        hidden_states: with `output_hidden_states=True`, every hidden state of the vision encoder.
        attentions: with `output_attentions=True`, the vision encoder's attention weights, one per encoder layer.
        merger_attentions: with `output_attentions=True`, the token merger's attention weights.
        image_embeds: `(num_images, max_tokens, text_hidden_size)` projected tokens; padding slots are meaningless.
        token_mask: `(num_images, max_tokens)` which slots hold a real token.
        num_tokens: `(num_images,)` tokens per image (after prompt-aware reduction, when it ran).
        num_tokens_before_reduction: `(num_images,)` tokens per image SeTok gave, before any reduction.
        kept_indices: with prompt-aware reduction, `(num_images, max_tokens)` the SeTok index of each kept token
            (-1 in padding slots); `None` without it.
        tokenizer_output: the SeTok output (assignment, scores, patch features) the tokens came from.
    """

    merger_attentions: tuple[torch.FloatTensor | None, ...] | None = None
    image_embeds: torch.FloatTensor | None = None
    token_mask: torch.BoolTensor | None = None
    num_tokens: torch.LongTensor | None = None
    num_tokens_before_reduction: torch.LongTensor | None = None
    kept_indices: torch.LongTensor | None = None
    tokenizer_output: SetokModelOutput | None = None


@dataclass
class SetokimMultimodalInputs(ModelOutput):
    """Text inputs with every image placeholder expanded, and the images that fill them.

    Attributes:
        input_ids: the expanded ids (when ids were given); image positions hold the placeholder id.
        inputs_embeds: the expanded embeddings with the images written in (when embeddings were given).
        attention_mask, position_ids, labels, shift_labels: of the expanded sequence (labels `-100` on image
            positions).
        image_embeds: `(batch, max image tokens per row, text_hidden_size)` each row's image tokens in order, which
            fill the image positions of `input_ids`.
        image_features: what [`SetokimModel.get_image_features`] returned.
        generation_targets: `(num_images,)` which images the labels ask the model to write (with a vision head).
        image_rows: `(num_images,)` the row each image is in.
    """

    input_ids: torch.LongTensor | None = None
    inputs_embeds: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    position_ids: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    shift_labels: torch.LongTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    image_features: SetokimImageFeatures | None = None
    generation_targets: torch.BoolTensor | None = None
    image_rows: torch.LongTensor | None = None


class DeprecatedImageFeatures:
    """The outputs' former name for `image_outputs`, kept working while callers move to Transformers' name."""

    @property
    def image_features(self) -> SetokimImageFeatures | None:
        logger.warning_once("`image_features` is deprecated: use `image_outputs`, Transformers' name for it")
        return self.image_outputs


@dataclass
class SetokimModelOutputWithPast(DeprecatedImageFeatures, MultimodalBaseModelOutputWithPast):
    """Language-model hidden states over the expanded sequence.

    Attributes:
        image_outputs: the images' [`SetokimImageFeatures`] (what `get_image_features` returns), when
            `pixel_values` were given.
        attention_mask: `(batch, expanded_length)` mask of the expanded sequence the states align with.
        labels: expanded labels when labels were given (`-100` on padding and on images the model only reads).
        shift_labels: the expanded targets, each the label of the next position, when `shift_labels` were given.
        generation_targets: `(num_images,)` which images the labels ask the model to write (with a vision head).
        image_rows: `(num_images,)` the row each image is in.
    """

    image_outputs: SetokimImageFeatures | None = None
    attention_mask: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    shift_labels: torch.LongTensor | None = None
    generation_targets: torch.BoolTensor | None = None
    image_rows: torch.LongTensor | None = None


@dataclass
class SetokimCausalLMOutputWithPast(DeprecatedImageFeatures, MultimodalCausalLMOutputWithPast):
    """Logits over the expanded sequence; `loss` covers the text targets and, with a vision head, the images the
    labels ask the model to write (when to stop, and their tokens).

    Attributes:
        image_outputs: the images' [`SetokimImageFeatures`] (what `get_image_features` returns), when
            `pixel_values` were given.
        attention_mask: `(batch, expanded_length)` mask of the expanded sequence the logits align with.
        labels: expanded labels when labels were given (`-100` on padding and on images the model only reads).
        shift_labels: the expanded targets, each the label of the next position, when `shift_labels` were given.
        image_regression_loss: the weighted MSE + cosine loss of the predicted tokens of the images to write
            (already part of `loss`).
        mask_logits: with `target_masks`, the mask decoder's logits of each segmented row's region.
        mask_loss: with `target_masks`, the weighted BCE + Dice loss of those masks (already part of `loss`).
    """

    image_outputs: SetokimImageFeatures | None = None
    attention_mask: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    shift_labels: torch.LongTensor | None = None
    image_regression_loss: torch.FloatTensor | None = None
    mask_logits: torch.FloatTensor | None = None
    mask_loss: torch.FloatTensor | None = None


FORWARD_KWARGS = frozenset(TransformersKwargs.__annotations__)
"""Keyword arguments `forward` passes on to the language model (the ones every Transformers model takes)."""


def check_forward_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments no part of the model reads, instead of letting the language model drop them."""
    unknown = sorted(set(kwargs) - FORWARD_KWARGS)
    if unknown:
        raise TypeError(
            f"Setokim got unexpected keyword argument(s) {unknown}. Images go in as pixel_values: prepare the "
            "inputs with the processor, processor(images=..., text=..., return_tensors='pt'), and pass model(**inputs)"
        )


class SetokimProjector(nn.Sequential):
    """`linear` or `mlp{N}x_gelu`: token width -> LLM width (the LLaVA projector shapes)."""

    def __init__(self, config: SetokimConfig) -> None:
        token_size, text_size = config.setok_config.token_size, config.text_config.hidden_size
        layers: list[nn.Module] = [nn.Linear(token_size, text_size)]
        for _ in range(config.projector_depth - 1):
            layers += [nn.GELU(), nn.Linear(text_size, text_size)]
        super().__init__(*layers)


class SetokimPreTrainedModel(NativePartsInitialization, PreTrainedModel):
    config: SetokimConfig
    config_class = SetokimConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
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

    # a whole Setokim checkpoint also loads as its base model: the LM head is simply not part of it
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

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

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        cluster_threshold: float | None = None,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
        cluster_k: int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        visual_token_keep: float | int | None = None,
        visual_token_merge: bool | None = None,
    ) -> SetokimImageFeatures:
        """Tokenize images with SeTok and project the tokens to the language model's width.

        The clustering arguments override the SeTok config for this call, as in [`SetokModel.forward`]. Given the
        prompts (`input_ids` or `inputs_embeds`, one placeholder per image), each image keeps only the tokens its
        prompt is about when `visual_token_keep` (per call, or in the config) asks for it; see
        [`reduce_image_tokens`]. Without a prompt there is nothing to query, and every token is returned.
        """
        keep = self.config.visual_token_keep if visual_token_keep is None else visual_token_keep
        merge = self.config.visual_token_merge if visual_token_merge is None else visual_token_merge
        has_prompt = input_ids is not None or inputs_embeds is not None
        if visual_token_keep is not None and not has_prompt:
            raise ValueError(
                "visual_token_keep chooses each image's tokens by its prompt: pass the prompts (input_ids or "
                "inputs_embeds, with attention_mask) to get_image_features"
            )
        if visual_token_merge is not None and keep is None:
            raise ValueError("visual_token_merge merges the tokens visual_token_keep drops, but no keep was set")
        if keep is not None:
            check_keep(keep, "visual_token_keep")
        tokenizer_output = self.setok(
            pixel_values,
            cluster_threshold=cluster_threshold,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
            cluster_k=cluster_k,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        image_embeds = self.multi_modal_projector(tokenizer_output.tokens)
        token_mask, num_tokens, kept_indices = tokenizer_output.token_mask, tokenizer_output.num_tokens, None
        if keep is not None and has_prompt:
            reduction = self.reduce_image_tokens(
                image_embeds, token_mask, input_ids, inputs_embeds, attention_mask, keep, merge
            )
            image_embeds, token_mask = reduction.image_embeds, reduction.token_mask
            num_tokens, kept_indices = reduction.num_tokens_after, reduction.kept_indices
        return SetokimImageFeatures(
            last_hidden_state=tokenizer_output.patch_features,
            pooler_output=tuple(embeds[:count] for embeds, count in zip(image_embeds, num_tokens)),
            hidden_states=tokenizer_output.hidden_states,
            attentions=tokenizer_output.attentions,
            merger_attentions=tokenizer_output.merger_attentions,
            image_embeds=image_embeds,
            token_mask=token_mask,
            num_tokens=num_tokens,
            num_tokens_before_reduction=tokenizer_output.num_tokens,
            kept_indices=kept_indices,
            tokenizer_output=tokenizer_output,
        )

    def reduce_image_tokens(
        self,
        image_embeds: torch.Tensor,
        token_mask: torch.BoolTensor,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        keep: float | int,
        merge_dropped: bool,
    ) -> TokenReductionOutput:
        """TRSM: each image keeps the tokens that best match the text of its own prompt row.

        The query is that row's input embeddings where `attention_mask` is set, leaving out the image positions and
        the special tokens the config names (`<image>`, `[Img]`, `[/Img]`, BOS, EOS, padding), found by id, or by
        their embedding in `inputs_embeds`. Several images in one row share its query.
        """
        placeholder_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
        check_placeholder_count(placeholder_mask, self.config.image_token_id, len(image_embeds))
        text_embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)
        query_mask = ~self.special_token_mask(input_ids, inputs_embeds)
        if attention_mask is not None:
            query_mask &= attention_mask.bool()
        image_rows = placeholder_mask.nonzero()[:, 0]
        rows_without_text = sorted(set(image_rows[~query_mask.any(dim=1)[image_rows]].tolist()))
        if rows_without_text:
            raise ValueError(
                f"visual_token_keep chooses an image's tokens by its prompt's text, but rows {rows_without_text} "
                "hold no text besides special tokens and images"
            )
        return prompt_aware_token_reduction(
            image_embeds, token_mask, text_embeds, query_mask, keep, merge_dropped, image_rows
        )

    def special_token_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """Where the image tokens and the language model's BOS, EOS and padding stand, by id or by embedding."""
        config, text_config = self.config, self.config.text_config
        ids = {config.image_token_id, config.image_start_token_id, config.image_end_token_id}
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(text_config, name, None)
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
        embeddings = self.get_input_embeddings()
        special = torch.tensor(sorted(ids), device=embeddings.weight.device)
        if input_ids is not None:
            return torch.isin(input_ids, special.to(input_ids.device))
        special_embeds = embeddings(special).to(inputs_embeds.device, inputs_embeds.dtype)
        return (inputs_embeds[:, :, None, :] == special_embeds).all(dim=-1).any(dim=-1)

    def placeholder_embedding(self) -> torch.Tensor:
        """The input embedding of the `<image>` placeholder, by which it is found in caller-given `inputs_embeds`."""
        config, embeddings = self.config, self.get_input_embeddings()
        ids = [config.image_token_id, config.image_start_token_id, config.image_end_token_id]
        placeholder, *wrappers = embeddings(torch.tensor(ids, device=embeddings.weight.device))
        if any(torch.equal(placeholder, wrapper) for wrapper in wrappers):
            raise ValueError(
                "the <image> placeholder's input embedding equals that of [Img] or [/Img], so it cannot be found in "
                "inputs_embeds; pass input_ids, or give the three tokens distinct embeddings"
            )
        return placeholder

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.BoolTensor:
        """Where the `<image>` placeholders stand: by id, or (as LLaVA does) by their embedding."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        return (inputs_embeds == self.placeholder_embedding().to(inputs_embeds.dtype)).all(dim=-1)

    def check_context_length(self, attention_mask: torch.Tensor, num_tokens: torch.LongTensor) -> None:
        """Refuse an expanded sequence the language model has no positions for, before it runs."""
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        length = attention_mask.shape[1]
        if limit is None or length <= limit:
            return
        setok_config = self.config.setok_config
        raise ValueError(
            f"with its image tokens the input is {length} positions long, more than the language model's "
            f"{limit} (max_position_embeddings); the images became {num_tokens.tolist()} tokens. Bound the count "
            f"with max_tokens (now {setok_config.max_tokens}) or raise cluster_threshold (now "
            f"{setok_config.cluster_threshold}), per call or in config.setok_config, or send fewer images"
        )

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.LongTensor | None,
        pixel_values: torch.FloatTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        padding_side: str | None = None,
        shift_labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        visual_token_keep: float | int | None = None,
        visual_token_merge: bool | None = None,
        **clustering: Any,
    ) -> SetokimMultimodalInputs:
        """Tokenize the images, then expand each placeholder to its image's tokens (shared by forward and generate).

        The placeholders are found in `input_ids`, or in `inputs_embeds` by their embedding; `clustering` holds
        per-call overrides of the SeTok config (`cluster_threshold`, `min_tokens`, `max_tokens`, `cluster_k`).
        `output_hidden_states` and `output_attentions` ask the image features for them, as in `get_image_features`.
        With `visual_token_keep` (per call or in the config) each image keeps the tokens its prompt is about, before
        expansion, so the expanded ids, positions and labels (and a cache built on them) hold the kept counts. The
        query is the prompt only: positions the labels train (the answer) are left out of it, so training reads
        the tokens generation would.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(
                "pixel_values need exactly one of input_ids and inputs_embeds, holding one image placeholder per image"
            )
        check_pixel_values(pixel_values, self.config.setok_config.vision_config.num_channels)
        placeholder_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
        check_placeholder_count(placeholder_mask, self.config.image_token_id, len(pixel_values))  # before encoding
        for name, targets in (("labels", labels), ("shift_labels", shift_labels)):
            if targets is not None and targets.shape != placeholder_mask.shape:
                raise ValueError(
                    f"{name} must align with the caller's input_ids, shape {tuple(placeholder_mask.shape)}, got "
                    f"{tuple(targets.shape)}; the model expands both"
                )
        generation_targets = None
        if labels is not None and self.config.vision_output_head:
            generation_targets = labels[placeholder_mask] != IGNORE_INDEX
        reducing = (self.config.visual_token_keep if visual_token_keep is None else visual_token_keep) is not None
        if reducing and generation_targets is not None and bool(generation_targets.any()):
            raise ValueError(
                "visual_token_keep reduces the images the model reads, but the labels ask it to write images "
                f"{generation_targets.nonzero().flatten().tolist()}, whose tokens are targets; train image writing "
                "with visual_token_keep=None"
            )
        query_attention = torch.ones_like(placeholder_mask) if attention_mask is None else attention_mask.bool()
        if labels is not None:
            query_attention = query_attention & (labels == IGNORE_INDEX)
        if shift_labels is not None:
            query_attention = query_attention & torch.cat(
                [torch.ones_like(shift_labels[:, :1], dtype=torch.bool), shift_labels[:, :-1] == IGNORE_INDEX], dim=1
            )
        features = self.get_image_features(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=query_attention,
            visual_token_keep=visual_token_keep,
            visual_token_merge=visual_token_merge,
            return_dict=True,
            **clustering,
        )
        pad_token_id = self.config.text_config.pad_token_id
        expanded: ExpandedInputs = expand_image_placeholders(
            placeholder_mask,
            attention_mask,
            features.num_tokens,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            shift_labels=shift_labels,
            pad_token_id=pad_token_id if pad_token_id is not None else 0,
            padding_side=padding_side,
            keep_image_labels=self.config.vision_output_head,
        )
        self.check_context_length(expanded.attention_mask, features.num_tokens)
        image_rows = placeholder_mask.nonzero()[:, 0]
        image_embeds = pack_image_embeds(features.image_embeds, features.token_mask, image_rows, len(placeholder_mask))
        filled_embeds = None
        if expanded.inputs_embeds is not None:
            filled_embeds = fill_image_positions(expanded.inputs_embeds, expanded.image_mask, image_embeds)
            image_embeds = None
        return SetokimMultimodalInputs(
            input_ids=expanded.input_ids,
            inputs_embeds=filled_embeds,
            attention_mask=expanded.attention_mask,
            position_ids=expanded.position_ids,
            labels=expanded.labels,
            shift_labels=expanded.shift_labels,
            image_embeds=image_embeds,
            image_features=features,
            generation_targets=generation_targets,
            image_rows=image_rows,
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
        return fill_image_positions(inputs_embeds, is_image, image_embeds)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cluster_threshold: float | None = None,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
        cluster_k: int | None = None,
        visual_token_keep: float | int | None = None,
        visual_token_merge: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SetokimModelOutputWithPast:
        """Run the language model over text with images.

        With `pixel_values`, `input_ids` (or `inputs_embeds`) hold one placeholder per image, as the processor
        writes them, and are expanded here; `labels` and `shift_labels` (the shifted targets sequence-parallel
        training passes, aligned with the caller's `input_ids` too), if given, are expanded alongside and returned.
        Without them, `input_ids` may already be expanded, with `image_embeds` (from `prepare_multimodal_inputs`)
        filling the image positions. The clustering arguments override the SeTok config for this call, and
        `visual_token_keep`/`visual_token_merge` its prompt-aware token reduction (see
        [`prepare_multimodal_inputs`]).
        """
        check_forward_kwargs(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        image_settings = dict(
            cluster_threshold=cluster_threshold,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
            cluster_k=cluster_k,
            visual_token_keep=visual_token_keep,
            visual_token_merge=visual_token_merge,
        )
        image_outputs = generation_targets = image_rows = None
        if pixel_values is not None:
            if image_embeds is not None or position_ids is not None:
                raise ValueError(
                    "pixel_values expand the sequence, so image_embeds and position_ids cannot be given with them"
                )
            prepared = self.prepare_multimodal_inputs(
                input_ids,
                pixel_values,
                attention_mask,
                labels,
                inputs_embeds=inputs_embeds,
                shift_labels=shift_labels,
                output_hidden_states=kwargs.get("output_hidden_states"),
                output_attentions=kwargs.get("output_attentions"),
                **image_settings,
            )
            input_ids, inputs_embeds = prepared.input_ids, prepared.inputs_embeds
            attention_mask, position_ids = prepared.attention_mask, prepared.position_ids
            labels, shift_labels = prepared.labels, prepared.shift_labels
            image_embeds, image_outputs = prepared.image_embeds, prepared.image_features
            generation_targets, image_rows = prepared.generation_targets, prepared.image_rows
        else:
            check_image_settings_have_images(image_settings)
            if inputs_embeds is not None:
                if image_embeds is not None:
                    raise ValueError(
                        "image_embeds fill the image positions of input_ids; with inputs_embeds, pass pixel_values "
                        "(the placeholders are found by their embedding) or write the images into inputs_embeds"
                    )
                if bool(self.get_placeholder_mask(None, inputs_embeds).any()):
                    raise ValueError(
                        "inputs_embeds hold image placeholder embeddings but no pixel_values were given; pass the "
                        "images the placeholders stand for"
                    )
        if inputs_embeds is None:
            inputs_embeds = self.embed_with_images(input_ids, image_embeds)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        return SetokimModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            attention_mask=attention_mask,
            labels=labels,
            shift_labels=shift_labels,
            image_outputs=image_outputs,
            generation_targets=generation_targets,
            image_rows=image_rows,
        )


class SuppressImagePlaceholder(LogitsProcessor):
    """Text generation never writes the `<image>` placeholder: only the processor places images."""

    def __init__(self, image_token_id: int) -> None:
        self.image_token_id = image_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores.index_fill(-1, torch.tensor([self.image_token_id], device=scores.device), -float("inf"))


class CallerPromptStreamer(BaseStreamer):
    """Hands a streamer the caller's prompt instead of the expanded one, then passes every new token through.

    `generate` puts the prompt first; after expansion that prompt holds one position per image token, which a
    `TextStreamer(skip_prompt=False)` would print as rows of placeholders.
    """

    def __init__(self, streamer: BaseStreamer, prompt: torch.LongTensor) -> None:
        self.streamer, self.prompt = streamer, prompt

    def put(self, value: torch.Tensor) -> None:
        if self.prompt is not None:
            value, self.prompt = self.prompt.to(value.device), None
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()


class SetokimForConditionalGeneration(SetokimPreTrainedModel, GenerationMixin):
    """Setokim with a language-modelling head: answers about images with `generate()`, trains with `Trainer`."""

    def __init__(self, config: SetokimConfig) -> None:
        super().__init__(config)
        self.model = SetokimModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.vision_head = SetokimVisionHead(config) if config.vision_output_head else None
        self.detokenizer = (
            SetokDetokenizer(config.detokenizer_config) if config.detokenizer_config is not None else None
        )
        self.mask_decoder = None
        if config.mask_decoder_config is not None:
            by_tokens = config.mask_decoder_config.query_source == "tokens"
            self.mask_decoder = SetokimMaskDecoder(
                config.mask_decoder_config,
                query_size=config.setok_config.token_size if by_tokens else config.text_config.hidden_size,
                feature_size=config.setok_config.vision_config.hidden_size,
            )
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
    ) -> tuple["SetokimForConditionalGeneration", SetokimProcessor]:
        """A Setokim assembled from pretrained parts, ready for training, and the processor that goes with it.

        Args:
            vision: a SeTok tokenizer (`SetokModel` or its folder), or any vision encoder (a model or folder; the
                vision tower of a CLIP/SigLIP dual encoder is taken) around which a fresh merger is built.
            language_model: any causal LM (a model or folder / Hub id).
            tokenizer: its tokenizer; loaded from `language_model` when that is a path.
            projector_type: `"linear"` or `"mlp{N}x_gelu"`.
            dtype: the composed model's dtype (the parts' own dtypes by default: float32 unless they differ).
            setok_kwargs: `SetokConfig` settings (threshold, budget, merger sizes) for a fresh SeTok; its budget
                `max_tokens` defaults to `DEFAULT_MAX_TOKENS` (64) tokens per image.

        `[Img]`, `[/Img]` and `<image>` are added to the tokenizer; their embeddings start at the mean of the
        existing ones (each with a tiny offset of its own), so they begin as neutral as an embedding can be.
        """
        check_parts(vision, language_model)
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

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs: Any) -> SetokimImageFeatures:
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cluster_threshold: float | None = None,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
        cluster_k: int | None = None,
        target_masks: torch.Tensor | None = None,
        target_mask_rows: torch.BoolTensor | None = None,
        visual_token_keep: float | int | None = None,
        visual_token_merge: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SetokimCausalLMOutputWithPast:
        """Logits over the expanded sequence, and the training loss when `labels` are given.

        `labels` align with the caller's `input_ids`, and so does a `shift_labels` keyword argument (the already
        shifted targets that sequence-parallel training passes beside them), which then replaces the shifted labels
        as the text targets. As in every Transformers causal LM it travels in `kwargs`, so `Trainer` still finds
        `labels` alone as the label argument. The loss is the next-token loss on text; with a vision head,
        images whose placeholder is labelled (in the answer) are images to write, which adds their stopping and
        token regression; with `target_masks` (`(rows, height, width)`, one per row of `target_mask_rows`, all rows
        by default), each such row's written image is the referred region, and the mask decoder's BCE + Dice
        against the mask is added too. `visual_token_keep` and `visual_token_merge` reduce the image tokens by the
        prompt for this call, as in [`SetokimModel.prepare_multimodal_inputs`].
        """
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            image_embeds=image_embeds,
            labels=labels,
            shift_labels=shift_labels,
            use_cache=use_cache,
            cluster_threshold=cluster_threshold,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
            cluster_k=cluster_k,
            visual_token_keep=visual_token_keep,
            visual_token_merge=visual_token_merge,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = regression_loss = None
        if outputs.labels is not None:
            loss = self.loss_function(
                logits,
                outputs.labels,
                vocab_size=self.config.text_config.vocab_size,
                shift_labels=outputs.shift_labels,
                **kwargs,
            )
            if outputs.generation_targets is not None and bool(outputs.generation_targets.any()):
                regression_loss = self.image_regression_loss(outputs)
                loss = loss + regression_loss
        mask_logits = segmentation_loss = None
        if target_masks is not None:
            mask_logits = self.region_mask_logits(outputs, target_mask_rows)
            decoder_config = self.config.mask_decoder_config
            segmentation_loss = mask_loss(
                mask_logits, target_masks.to(mask_logits.device), decoder_config.bce_weight, decoder_config.dice_weight
            )[0]
            loss = loss + segmentation_loss
        return SetokimCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            attention_mask=outputs.attention_mask,
            labels=outputs.labels,
            shift_labels=outputs.shift_labels,
            image_outputs=outputs.image_outputs,
            image_regression_loss=regression_loss,
            mask_logits=mask_logits,
            mask_loss=segmentation_loss,
        )

    def add_image_generation(self, detokenizer: SetokDetokenizer | None = None) -> None:
        """Give a Setokim what drawing needs: a fresh vision head (unless it has one) and, when given, the
        `detokenizer` that renders its tokens, which from then on is saved in and loaded from its checkpoint."""
        if self.vision_head is None:
            self.config.vision_output_head = True
            self.vision_head = SetokimVisionHead(self.config).to(self.lm_head.weight.device, self.lm_head.weight.dtype)
        if detokenizer is not None:
            if detokenizer.config.token_size != self.config.setok_config.token_size:
                raise ValueError(
                    f"detokenizer reads {detokenizer.config.token_size}-wide tokens, but this Setokim writes "
                    f"{self.config.setok_config.token_size}-wide ones"
                )
            self.config.detokenizer_config = detokenizer.config
            self.detokenizer = detokenizer

    def target_predictions(self, outputs: SetokimModelOutputWithPast) -> tuple[torch.Tensor, torch.LongTensor]:
        """Teacher forcing of the images to write: the hidden state before each of their positions (row-major),
        and the row of each."""
        positions = outputs.labels == self.config.image_token_id
        if bool(positions[:, 0].any()):
            raise ValueError("an image to write cannot start a sequence: it follows [Img]")
        return outputs.last_hidden_state[:, :-1][positions[:, 1:]], positions.nonzero()[:, 0]

    def written_targets(self, outputs: SetokimModelOutputWithPast) -> torch.Tensor:
        """The tokenizer's tokens of the images to write, in the row-major order of their positions (fixed targets)."""
        features, targets = outputs.image_outputs, outputs.generation_targets
        return features.tokenizer_output.tokens[targets][features.token_mask[targets]].detach()

    def image_regression_loss(self, outputs: SetokimModelOutputWithPast) -> torch.Tensor:
        """The vision head's tokens before each position of an image to write, against that position's token."""
        predicted = self.vision_head(self.target_predictions(outputs)[0])
        config = self.config
        return image_regression_loss(
            predicted,
            self.written_targets(outputs),
            config.image_regression_mse_weight,
            config.image_regression_cosine_weight,
        )

    def region_mask_logits(self, outputs: SetokimModelOutputWithPast, rows: torch.BoolTensor | None) -> torch.Tensor:
        """Teacher-forced masks: each segmented row's region (its one image to write) read by the mask decoder
        against the last image the row reads. The queries are the region's true tokens (`query_source="tokens"`;
        the vision head learns to write them through the regression loss) or the LLM's states before them."""
        if self.mask_decoder is None:
            raise ValueError("target_masks need a mask decoder: give the config a mask_decoder_config")
        if outputs.generation_targets is None or not bool(outputs.generation_targets.any()):
            raise ValueError(
                "target_masks need labels that mark each segmented row's answer image (the region to write)"
            )
        batch_size = len(outputs.labels)
        rows = torch.ones(batch_size, dtype=torch.bool) if rows is None else rows.bool().cpu()
        per_row = torch.bincount(outputs.image_rows[outputs.generation_targets].cpu(), minlength=batch_size)
        if bool((per_row[rows] != 1).any()):
            raise ValueError(
                f"each segmented row must hold exactly one image to write (its region), got {per_row[rows].tolist()}"
            )
        hidden, token_rows = self.target_predictions(outputs)
        by_tokens = self.config.mask_decoder_config.query_source == "tokens"
        queries = self.written_targets(outputs).to(hidden.dtype) if by_tokens else hidden
        queries, lengths = pack_rows(queries, token_rows, batch_size, 0.0, "right")
        query_mask = torch.arange(queries.shape[1], device=queries.device)[None, :] < lengths[:, None]
        images = region_images(outputs.image_rows, outputs.generation_targets, batch_size, rows)
        selected = rows.nonzero()[:, 0].to(queries.device)
        tokenizer_output = outputs.image_outputs.tokenizer_output
        return self.mask_decoder(
            queries[selected],
            query_mask[selected],
            tokenizer_output.patch_features[images[selected]],
            tokenizer_output.grid_size,
        )

    def write_image_tokens(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None,
        attention_mask: torch.Tensor | None,
        max_image_tokens: int,
        max_new_tokens: int,
        **generate_kwargs: Any,
    ) -> tuple[WrittenVisionTokens, list[list[int]], list[bool]]:
        """What drawing and segmenting share: up to `max_new_tokens` of text (stopping at `[Img]` or EOS), then
        `[Img]` and the vision-token loop. Returns the written tokens, each row's prompt up to `[Img]`, and whether
        each row opened the image itself."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        new_tokens = None
        stops = text_stops(self.config.image_start_token_id, self.generation_config.eos_token_id)
        if max_new_tokens > 0:
            text = self.generate(
                input_ids,
                pixel_values,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=generate_kwargs.pop("eos_token_id", stops),
                **generate_kwargs,
            )
            new_tokens = text[:, input_ids.shape[1] :]
        prompts, opened = prompts_opening_an_image(input_ids, attention_mask, new_tokens, stops)
        pad_token_id = self.config.text_config.pad_token_id
        ids, mask = left_pad(prompts, pad_token_id if pad_token_id is not None else 0, input_ids.device)
        return write_vision_tokens(self, ids, mask, pixel_values, max_image_tokens), prompts, opened

    @torch.no_grad()
    def generate_images(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_image_tokens: int | None = None,
        max_new_tokens: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        render: bool = True,
        **generate_kwargs: Any,
    ) -> SetokimImageGenerationOutput:
        """Draw (text prompts) or edit (prompts with images) one image per prompt, batched with left padding.

        The model may first write up to `max_new_tokens` of text with the usual decoding options
        (`generate_kwargs`), stopping at `[Img]` or EOS; every row then opens `[Img]` and writes vision tokens on the
        KV cache until its LM head closes the image with `[/Img]` or `max_image_tokens` (the SeTok budget, or 64)
        is reached. The detokenizer renders the tokens (`num_inference_steps`, `guidance_scale`, `generator`,
        `output_type` as in [`SetokDetokenizerPipeline`]); `render=False` returns the tokens alone.
        """
        if max_image_tokens is None:
            max_image_tokens = self.config.setok_config.max_tokens or DEFAULT_MAX_TOKENS
        check_generation_setup(self, max_image_tokens, render)
        written, prompts, _ = self.write_image_tokens(
            input_ids, pixel_values, attention_mask, max_image_tokens, max_new_tokens, **generate_kwargs
        )
        images = None
        if render:
            pipeline = SetokDetokenizerPipeline.from_detokenizer(self.detokenizer)
            images = pipeline(
                tokens=written.tokens,
                token_mask=written.token_mask,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type=output_type,
            ).images
        return SetokimImageGenerationOutput(
            images=images,
            tokens=written.tokens,
            token_mask=written.token_mask,
            num_tokens=written.num_tokens,
            sequences=written_sequences(prompts, written.num_tokens, self.config, input_ids.device),
        )

    @torch.no_grad()
    def segment(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor,
        attention_mask: torch.Tensor | None = None,
        max_region_tokens: int | None = None,
        max_new_tokens: int = 0,
        **generate_kwargs: Any,
    ) -> SetokimSegmentationOutput:
        """Segment what each prompt refers to in its (last) image, batched with left padding.

        The model writes the referred region's vision tokens as it writes an image (`max_new_tokens` of text first,
        as in [`generate_images`]), and the mask decoder reads them against the image's patch features. A row whose
        text ends (EOS) before it opens `[Img]` writes no region: its mask is empty and `region_found` says so.
        Post-process with `SetokimProcessor.post_process_masks` to get masks at each original image's size.
        """
        if self.mask_decoder is None:
            raise ValueError(
                "this Setokim has no mask decoder, so it cannot segment; give its config a mask_decoder_config (and "
                "train it on referring data)"
            )
        if max_region_tokens is None:
            max_region_tokens = self.config.setok_config.max_tokens or DEFAULT_MAX_TOKENS
        check_generation_setup(self, max_region_tokens, render=False)
        image_rows = (input_ids == self.config.image_token_id).nonzero()[:, 0]
        images = region_images(image_rows, torch.zeros_like(image_rows, dtype=torch.bool), len(input_ids))
        written, prompts, opened = self.write_image_tokens(
            input_ids, pixel_values, attention_mask, max_region_tokens, max_new_tokens, **generate_kwargs
        )
        tokenizer_output = written.image_features.tokenizer_output
        queries = written.tokens if self.config.mask_decoder_config.query_source == "tokens" else written.hidden_states
        logits = self.mask_decoder(
            queries, written.token_mask, tokenizer_output.patch_features[images], tokenizer_output.grid_size
        )
        region_found = torch.tensor(opened, device=logits.device)
        logits = logits.masked_fill(~region_found[:, None, None], torch.finfo(logits.dtype).min)
        return SetokimSegmentationOutput(
            mask_logits=logits,
            region_found=region_found,
            tokens=written.tokens,
            token_mask=written.token_mask,
            num_tokens=written.num_tokens,
            sequences=written_sequences(prompts, written.num_tokens, self.config, input_ids.device),
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The stock preparation, with `image_embeds` passed only while image positions are still to be run.

        Continuing from a cache, the cached prefix already holds its images, so each row's remaining image
        tokens start after the ones in that prefix.
        """
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, inputs_embeds=inputs_embeds, **kwargs
        )
        new_ids = model_inputs.get("input_ids")
        image_token_id = self.config.image_token_id
        if image_embeds is None or new_ids is None or not bool((new_ids == image_token_id).any()):
            return model_inputs
        cached = input_ids[:, : input_ids.shape[1] - new_ids.shape[1]]
        model_inputs["image_embeds"] = drop_leading_image_embeds(image_embeds, (cached == image_token_id).sum(dim=1))
        return model_inputs

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        logits_processor: LogitsProcessorList | None = None,
        streamer: BaseStreamer | None = None,
        cluster_threshold: float | None = None,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
        cluster_k: int | None = None,
        visual_token_keep: float | int | None = None,
        visual_token_merge: bool | None = None,
        **kwargs: Any,
    ) -> GenerateOutput | torch.LongTensor:
        """Expand the image placeholders, then run the standard `GenerationMixin.generate`.

        Every decoding strategy, streamer and cache works unchanged, and text generation never writes the
        `<image>` placeholder. The returned sequences are the caller's `input_ids` followed by the new tokens, so
        `out[:, inputs["input_ids"].shape[1]:]` is the answer (with `inputs_embeds`, only the new tokens, as for
        any Transformers model). A conversation continues from an earlier call's `cache` (`past_key_values`)
        when its `input_ids` repeat that call's sequences and `pixel_values` hold all its images again (the earlier
        turns' images keep the tokens the first call chose for them, with `visual_token_keep`).
        `visual_token_keep` and `visual_token_merge` reduce each image's tokens to what its prompt is about before
        the prefill, so the prompt, its positions and the cache hold only the kept tokens.
        """
        logits_processor = LogitsProcessorList(
            [*(logits_processor or []), SuppressImagePlaceholder(self.config.image_token_id)]
        )
        image_settings = dict(
            cluster_threshold=cluster_threshold,
            min_tokens=min_tokens,
            max_tokens=max_tokens,
            cluster_k=cluster_k,
            visual_token_keep=visual_token_keep,
            visual_token_merge=visual_token_merge,
        )
        if pixel_values is None:
            check_image_settings_have_images(image_settings)
            return super().generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                logits_processor=logits_processor,
                streamer=streamer,
                **kwargs,
            )
        if "position_ids" in kwargs:
            raise ValueError("pixel_values expand the sequence, so position_ids cannot be given with them")
        prepared = self.model.prepare_multimodal_inputs(
            input_ids, pixel_values, attention_mask, inputs_embeds=inputs_embeds, padding_side="left", **image_settings
        )
        check_cache_continuation(kwargs.get("cache", kwargs.get("past_key_values")), prepared.attention_mask)
        if inputs_embeds is not None:
            return super().generate(
                inputs_embeds=prepared.inputs_embeds,
                attention_mask=prepared.attention_mask,
                logits_processor=logits_processor,
                streamer=streamer,
                **kwargs,
            )
        output = super().generate(
            input_ids=prepared.input_ids,
            attention_mask=prepared.attention_mask,
            image_embeds=prepared.image_embeds,
            logits_processor=logits_processor,
            streamer=None if streamer is None else CallerPromptStreamer(streamer, input_ids),
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


def check_image_settings_have_images(settings: dict[str, Any]) -> None:
    """Clustering and reduction settings given without `pixel_values` would be silently ignored: refuse them."""
    given = sorted(name for name, value in settings.items() if value is not None)
    if given:
        raise ValueError(f"{given} set how images are tokenized, but no pixel_values were given")


def fill_image_positions(
    inputs_embeds: torch.Tensor, image_mask: torch.BoolTensor, image_embeds: torch.Tensor
) -> torch.Tensor:
    """Write each row's image tokens (`image_embeds`, in order) into its image positions."""
    per_row = image_mask.sum(dim=1)
    if (
        image_embeds.dim() != 3
        or image_embeds.shape[0] != len(image_mask)
        or int(per_row.max()) > image_embeds.shape[1]
    ):
        raise ValueError(
            f"image_embeds of shape {tuple(image_embeds.shape)} cannot fill {per_row.tolist()} image positions per row"
        )
    filled = torch.arange(image_embeds.shape[1], device=image_mask.device)[None, :] < per_row[:, None]
    return inputs_embeds.masked_scatter(image_mask[..., None], image_embeds[filled].to(inputs_embeds.dtype))


def check_cache_continuation(cache: Cache | None, attention_mask: torch.Tensor) -> None:
    """Continuing from a cache needs the cached positions to be the start of the expanded sequence."""
    if cache is None:
        return
    cached = cache.get_seq_length()
    if len(attention_mask) > 1 and cached > 0:
        raise ValueError(
            "continuing from a cache works for one conversation at a time: expanding the images re-pads a batch, "
            "so its cached positions no longer line up; continue each conversation alone, or pass the whole "
            "conversations without the cache"
        )
    if cached >= attention_mask.shape[1]:
        raise ValueError(
            f"the cache holds {cached} positions but the input with its image tokens is {attention_mask.shape[1]}; "
            "the new input_ids must repeat the earlier turns (the previous sequences) and add the new one"
        )


DEFAULT_MAX_TOKENS = 64
"""Most tokens per image of a fresh SeTok from `from_parts`, so images leave the LLM room for text (at
SigLIP-so400m sizes the bound would otherwise be 729 patches)."""


def part_model_type(part: str | PreTrainedModel) -> str:
    config = AutoConfig.from_pretrained(part) if isinstance(part, str) else part.config
    return config.model_type


def check_parts(vision: str | PreTrainedModel, language_model: str | PreTrainedModel) -> None:
    """Name what each `from_parts` argument must be when a part is in the wrong place."""
    vision_type, language_type = part_model_type(vision), part_model_type(language_model)
    usage = "from_parts(vision=<SeTok or vision encoder>, language_model=<causal LM>)"
    if language_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        swapped = " (the parts look swapped)" if vision_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else ""
        raise ValueError(
            f"language_model must be a causal language model (an AutoModelForCausalLM), got a {language_type!r} "
            f"model{swapped}; call {usage}"
        )
    if vision_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"vision must be a SeTok tokenizer or a vision encoder, got the causal language model {vision_type!r}; "
            f"call {usage}"
        )


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
    setok_kwargs.setdefault("max_tokens", max(DEFAULT_MAX_TOKENS, setok_kwargs.get("min_tokens", 1)))
    setok = SetokModel(SetokConfig(vision_config=vision.config, **setok_kwargs))
    setok.vision_model.load_state_dict(vision.state_dict())
    return setok


def resize_embeddings_to_mean(language_model: PreTrainedModel, vocab_size: int) -> None:
    """Grow the input (and untied output) embeddings to `vocab_size`, new rows near the mean of the old ones.

    Each new row is the mean plus its own offset of a thousandth of the rows' spread: as neutral as an embedding
    can be, yet distinct, so `<image>` can still be told from `[Img]` and `[/Img]` in `inputs_embeds`.
    """
    old_size = language_model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old_size:
        return
    language_model.resize_token_embeddings(vocab_size, mean_resizing=False)
    inputs, outputs = language_model.get_input_embeddings(), language_model.get_output_embeddings()
    untied = outputs is not None and outputs is not inputs
    with torch.no_grad():
        for embeddings in [inputs, outputs] if untied else [inputs]:
            old = embeddings.weight[:old_size]
            generator = torch.Generator().manual_seed(0)  # per table: the same offsets in every process
            offsets = torch.randn(vocab_size - old_size, old.shape[1], generator=generator).to(old)
            embeddings.weight[old_size:] = old.mean(dim=0) + 1e-3 * old.std(dim=0) * offsets


__all__ = [
    "SetokimCausalLMOutputWithPast",
    "SetokimForConditionalGeneration",
    "SetokimImageFeatures",
    "SetokimModel",
    "SetokimModelOutputWithPast",
    "SetokimPreTrainedModel",
]
