"""Train a small Llama-style tokenizer from text, so tests and tiny checkpoints need no Hub download."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from transformers import LlamaTokenizer
from transformers.tokenization_utils_base import generate_merges

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
# Llama's layout: ids 0-3 are the special tokens, then the 256 byte-fallback pieces.
NUM_RESERVED_PIECES = 4 + 256


def train_sentencepiece_tokenizer(texts: Iterable[str], save_dir: str | Path, vocab_size: int = 300) -> LlamaTokenizer:
    """Train a byte-fallback BPE sentencepiece model on `texts` and return it as a `LlamaTokenizer`.

    Byte fallback means any text encodes and decodes losslessly, however small the vocabulary. Training is
    single-threaded on the texts in order, so the same texts always give the same tokenizer. The tokenizer is
    saved to `save_dir`, so `AutoTokenizer.from_pretrained(save_dir)` loads it offline.

    Args:
        texts: training text; each string is one sentencepiece "sentence".
        save_dir: folder the tokenizer files are written to.
        vocab_size: upper bound on the vocabulary, special tokens and the 256 byte pieces included.
    """
    texts = [text for text in texts if text]
    if not texts:
        raise ValueError("texts: got no non-empty string to train the tokenizer on")
    if vocab_size <= NUM_RESERVED_PIECES:
        raise ValueError(
            f"vocab_size: must exceed {NUM_RESERVED_PIECES} (4 special tokens + 256 bytes), got {vocab_size}"
        )

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not hold enough merges to fill the vocabulary
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        # Keep text as is: the Transformers tokenizer has no normalizer, so training must not have one either.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=UNK_TOKEN,
        bos_piece=BOS_TOKEN,
        eos_piece=EOS_TOKEN,
        pad_piece=PAD_TOKEN,
        num_threads=1,
        minloglevel=2,
    )
    # Read the pieces through sentencepiece itself: converting the model file would need protobuf.
    pieces = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = {pieces.id_to_piece(index): index for index in range(pieces.get_piece_size())}
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        add_prefix_space=False,
    )
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer


__all__ = ["train_sentencepiece_tokenizer"]
