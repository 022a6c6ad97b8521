"""Build a tiny CLIP tokenizer offline: train a byte-pair vocabulary with `tokenizers`, hand it to CLIPTokenizer.

Ids depend on the training run, so a tokenizer is built once and saved next to the model that uses it
(``tokenizer.save_pretrained``); it is never rebuilt at load time.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]
ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789-',.")


def train_clip_tokenizer(corpus: Iterable[str], vocab_size: int = 1000, max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer whose BPE vocabulary and merges are learned from ``corpus``."""
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        end_of_word_suffix="</w>",
        initial_alphabet=ALPHABET,
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer)
    vocab = bpe.get_vocab()
    # Every single character must also exist as a word ending so no word falls back to <unk>.
    for ch in ALPHABET:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = _merges_of(bpe)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = max_length
    return tokenizer


def _merges_of(bpe: Tokenizer) -> list[tuple[str, str]]:
    import json

    state = json.loads(bpe.to_str())
    merges = state["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
