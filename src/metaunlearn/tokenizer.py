"""Build a tiny CLIP tokenizer offline: train a byte-pair vocabulary with `tokenizers`, hand it to CLIPTokenizer.

The trainer's tokens and merges are reproducible, but the ids it gives single characters follow a hash order that
changes between processes; ids are therefore reassigned in a canonical order (special tokens, then single
symbols sorted, then merge results in merge order), so the same corpus always gives the same tokenizer. A
tokenizer is still saved next to the model that uses it (``tokenizer.save_pretrained``), never rebuilt at load time.
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
    tokenizer = CLIPTokenizer(vocab=canonical_ids(vocab, merges), merges=merges)
    tokenizer.model_max_length = max_length
    return tokenizer


def canonical_ids(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, int]:
    """The same tokens with ids in a run-independent order (see the module docstring)."""
    merged = list(dict.fromkeys(a + b for a, b in merges))
    made = set(merged)
    singles = sorted(t for t in vocab if t not in made and t not in SPECIAL_TOKENS)
    order = [t for t in SPECIAL_TOKENS if t in vocab] + singles + [t for t in merged if t in vocab]
    return {token: i for i, token in enumerate(order)}


def _merges_of(bpe: Tokenizer) -> list[tuple[str, str]]:
    import json

    state = json.loads(bpe.to_str())
    merges = state["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
