"""The concept-level contrastive objective of SeTok pretraining.

Each image comes with concept phrases (object names, attributes, captions). A phrase's similarity to an image
is its best cosine match among that image's tokens (a token stands for one concept), scaled by a learnable
temperature. The loss is a multi-label InfoNCE over the global batch in both directions: phrase -> image
(softmax over images, the phrase's own image is the target) and image -> phrase (softmax over every phrase in
the batch, averaged over the image's own phrases, which are its positives).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as distributed_functional
from torch import nn
from transformers import AutoModel, PreTrainedConfig

MAX_LOGIT_SCALE = 100.0


def concept_contrastive_loss(
    tokens: torch.Tensor,
    token_mask: torch.BoolTensor,
    phrases: torch.Tensor,
    phrase_mask: torch.BoolTensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Multi-label InfoNCE between images' token sets and their phrases.

    Args:
        tokens: `(images, num_tokens, dim)` padded token sets; `token_mask` `(images, num_tokens)` marks real ones.
        phrases: `(images, num_phrases, dim)` each image's phrase embeddings; `phrase_mask` marks real phrases.
        logit_scale: log of the inverse temperature, one value (`exp` is capped at 100 as in CLIP).

    Images without phrases only serve as negatives. A batch without any phrase gives a zero loss that still
    depends on the inputs, so every process of a distributed step runs the same backward.
    """
    tokens = nn.functional.normalize(tokens, dim=-1)
    phrases = nn.functional.normalize(phrases, dim=-1)
    owners = torch.arange(phrases.shape[0], device=phrases.device)[:, None].expand(phrase_mask.shape)[phrase_mask]
    phrases = phrases[phrase_mask]
    if phrases.shape[0] == 0:
        return (tokens.sum() + logit_scale.sum()) * 0.0

    similarity = torch.einsum("pd,itd->pit", phrases, tokens).masked_fill(~token_mask[None], float("-inf"))
    logits = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE).reshape(()) * similarity.amax(dim=-1)
    phrase_to_image = nn.functional.cross_entropy(logits, owners)

    positives = (owners[:, None] == torch.arange(logits.shape[1], device=logits.device)[None]).to(logits.dtype)
    has_phrases = positives.sum(dim=0) > 0
    log_probs = logits.log_softmax(dim=0)
    image_to_phrase = -(log_probs * positives).sum(dim=0)[has_phrases] / positives.sum(dim=0)[has_phrases]
    return (phrase_to_image + image_to_phrase.mean()) / 2


def gather_across_processes(
    tokens: torch.Tensor, token_mask: torch.BoolTensor, phrases: torch.Tensor, phrase_mask: torch.BoolTensor
) -> tuple[torch.Tensor, torch.BoolTensor, torch.Tensor, torch.BoolTensor]:
    """Every process's tokens and phrases, concatenated in rank order, WITH gradients to the local ones.

    Processes may hold different batch, token and phrase counts: each pads to the largest, gathers, and the
    padding images are dropped again. Outside `torch.distributed` (or with one process) the inputs are returned.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tokens, token_mask, phrases, phrase_mask
    local = torch.tensor([tokens.shape[0], tokens.shape[1], phrases.shape[1]], device=tokens.device)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    batch, num_tokens, num_phrases = local.tolist()
    image_mask = torch.ones(tokens.shape[0], dtype=torch.long, device=tokens.device)

    def gather(tensor: torch.Tensor, length: int | None = None) -> torch.Tensor:
        padding = [0, 0] * (tensor.dim() - 2) + ([0, length - tensor.shape[1]] if length is not None else [])
        padded = nn.functional.pad(tensor, padding + [0, batch - tensor.shape[0]])
        return torch.cat(distributed_functional.all_gather(padded), dim=0)

    valid = gather(image_mask).bool()
    return (
        gather(tokens, num_tokens)[valid],
        gather(token_mask.long(), num_tokens)[valid].bool(),
        gather(phrases, num_phrases)[valid],
        gather(phrase_mask.long(), num_phrases)[valid].bool(),
    )


class SetokConceptHead(nn.Module):
    """Embeds concept phrases with any Hugging Face text model into token space and scores them against tokens.

    The text model is frozen by default (it then also stays in eval mode and runs without gradients); a linear
    projection from its pooled output to the token width and the temperature always train.
    """

    def __init__(
        self, text_config: PreTrainedConfig, token_size: int, logit_scale_init_value: float, freeze_text_model: bool
    ) -> None:
        super().__init__()
        self.text_model = AutoModel.from_config(text_config)
        self.projection = nn.Linear(text_config.hidden_size, token_size)
        self.logit_scale = nn.Parameter(torch.tensor([logit_scale_init_value]))  # shape (1,), as SigLIP's
        self.freeze_text_model = freeze_text_model
        if freeze_text_model:
            self.text_model.requires_grad_(False)

    def train(self, mode: bool = True) -> SetokConceptHead:
        super().train(mode)
        if self.freeze_text_model:
            self.text_model.eval()
        return self

    def embed_phrases(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.BoolTensor]:
        """`(images, num_phrases, length)` phrase ids -> `(images, num_phrases, token_size)` and the phrase mask.

        A phrase slot whose attention mask is all zero is padding; only real phrases go through the text model.
        """
        phrase_mask = attention_mask.bool().any(dim=-1)
        ids, mask = input_ids[phrase_mask], attention_mask[phrase_mask]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_text_model):
            encoded = self.text_model(input_ids=ids, attention_mask=mask)
        pooled = getattr(encoded, "pooler_output", None)
        if pooled is None:
            weights = mask[..., None].to(encoded.last_hidden_state.dtype)
            pooled = (encoded.last_hidden_state * weights).sum(dim=1) / weights.sum(dim=1)
        embeddings = self.projection(pooled)
        phrases = embeddings.new_zeros(*phrase_mask.shape, embeddings.shape[-1])
        return phrases.masked_scatter(phrase_mask[..., None], embeddings), phrase_mask

    def forward(
        self,
        tokens: torch.Tensor,
        token_mask: torch.BoolTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The contrastive loss of these images' tokens against their phrases, over all processes' images."""
        phrases, phrase_mask = self.embed_phrases(input_ids, attention_mask)
        gathered = gather_across_processes(tokens, token_mask, phrases, phrase_mask)
        return concept_contrastive_loss(*gathered, self.logit_scale)


__all__ = ["SetokConceptHead", "concept_contrastive_loss", "gather_across_processes"]
