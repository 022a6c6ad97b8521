"""New tokens whose embeddings train while every weight of the model stays as it was (textual inversion, soft
prompt attacks).

:class:`NewTokens` adds tokens to every tokenizer of a pipeline (SDXL has two), resizes each text encoder's input
embedding by those rows (initialised to the mean embedding of some words' tokens) and routes the new ids to
trainable vectors held outside the model: a forward hook on the input embedding replaces the rows looked up for the
new ids by the vectors. Only those vectors are optimised, so no other row can move (no weight decay or optimizer
state touches them). :meth:`NewTokens.remove` puts back the original tokenizers, embedding modules and configs, so
the model is exactly as before.

CLIP text encoders whose config says ``eos_token_id: 2`` (OpenAI's original configs) find the end of the prompt as the
position of the *largest* token id, which a new token would take over; while the tokens exist, the encoder is told
the tokenizer's real end-of-text id so pooled embeddings (SDXL) stay right.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from metaunlearn.backbones.base import Backbone
from metaunlearn.errors import UserError

ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


def known_token(tokenizer, token: str) -> bool:
    """Whether ``token`` is already in the vocabulary: an entry as written, or a word encoded as one known token
    (``triangle`` is ``triangle</w>`` in a CLIP vocabulary); adding it would take that word over in every prompt."""
    if token in tokenizer.get_vocab():
        return True
    ids = tokenizer(token, add_special_tokens=False).input_ids
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def check_new_tokens(tokenizers, tokens, where: str) -> None:
    """Refuse with one line any of ``tokens`` that one of ``tokenizers`` (SDXL: both) already knows."""
    for token in tokens:
        if any(known_token(t, token) for t in tokenizers if t is not None):
            raise UserError(f"token {token!r} is already in the vocabulary of {where}: it would take that word over "
                            "in every prompt; pick a new one, e.g. '<concept>'")


def folder_tokenizers(model_dir) -> list:
    """The tokenizers of a diffusers model folder (``tokenizer``, and ``tokenizer_2`` for SDXL), of the classes its
    ``model_index.json`` names."""
    import json
    from pathlib import Path

    import transformers

    index_file = Path(model_dir) / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    out = []
    for name, _ in ENCODERS:
        entry = index.get(name)
        if (Path(model_dir) / name).is_dir() and isinstance(entry, list) and len(entry) == 2 and entry[1]:
            cls = getattr(transformers, entry[1], transformers.AutoTokenizer)
            out.append(cls.from_pretrained(Path(model_dir) / name))
    return out


class NewTokens:
    """Tokens added to a backbone's tokenizers with one trainable embedding vector per token and text encoder."""

    def __init__(self, backbone: Backbone, tokens: Sequence[str], init_words: Sequence[str]) -> None:
        if len(tokens) != len(init_words) or not tokens:
            raise ValueError("one init text per new token")
        self.backbone = backbone
        self.tokens = list(tokens)
        self.vectors: list[torch.nn.Parameter] = []  # per encoder, [len(tokens), D] each
        self._undo: list = []
        pipe = backbone.pipe
        try:
            for tok_name, enc_name in ENCODERS:
                tokenizer, encoder = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
                if tokenizer is None or encoder is None:
                    continue
                self._add(tok_name, tokenizer, encoder, init_words)
        except BaseException:
            self.remove()
            raise

    def _add(self, tok_name: str, tokenizer, encoder, init_words: Sequence[str]) -> None:
        pipe = self.backbone.pipe
        check_new_tokens([tokenizer], self.tokens, str(self.backbone.source))
        embedding = encoder.get_input_embeddings()
        weight = embedding.weight
        init = []
        for words in init_words:
            ids = tokenizer(words, add_special_tokens=False).input_ids
            if not ids:
                raise UserError(f"init words {words!r} give no tokens")
            init.append(weight.detach()[ids].float().mean(0))
        original_tokenizer, original_vocab = tokenizer, encoder.config.vocab_size
        text_model = getattr(encoder, "text_model", None)
        original_eos = getattr(text_model, "eos_token_id", None)

        def undo() -> None:
            setattr(pipe, tok_name, original_tokenizer)
            encoder.set_input_embeddings(embedding)
            encoder.config.vocab_size = original_vocab
            if text_model is not None and original_eos is not None:
                text_model.eos_token_id = original_eos

        self._undo.append(undo)
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens(self.tokens)
        setattr(pipe, tok_name, tokenizer)
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        resized = torch.nn.Embedding(len(tokenizer), weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            resized.weight[: weight.shape[0]] = weight
            resized.weight[weight.shape[0]:] = torch.stack(init).to(weight.dtype)
        resized.requires_grad_(False)
        encoder.set_input_embeddings(resized)
        encoder.config.vocab_size = len(tokenizer)
        if text_model is not None and original_eos == 2 and tokenizer.eos_token_id not in (None, 2):
            text_model.eos_token_id = tokenizer.eos_token_id
        vectors = torch.nn.Parameter(torch.stack(init).to(weight.dtype).clone())
        self.vectors.append(vectors)
        new_ids = torch.tensor(ids, device=weight.device)

        def route(module, inputs, output):
            (input_ids,) = inputs[:1]
            hit = input_ids.unsqueeze(-1) == new_ids  # [B, L, K]
            if not bool(hit.any()):
                return output
            picked = hit.to(vectors.dtype) @ vectors  # [B, L, D]: the vector of the new token at its positions
            return torch.where(hit.any(-1, keepdim=True), picked.to(output.dtype), output)

        handle = resized.register_forward_hook(route)
        self._undo.append(handle.remove)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable vectors: one ``[len(tokens), D]`` tensor per text encoder."""
        return list(self.vectors)

    def remove(self) -> None:
        """Restore the tokenizers, embeddings and configs (idempotent)."""
        while self._undo:
            self._undo.pop()()
        for v in self.vectors:
            v.grad = None

    def __enter__(self) -> NewTokens:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
