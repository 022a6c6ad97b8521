"""Shared math of the closed-form edits (UCE, RECE) of the cross-attention key/value projections.

Every cross-attention layer ``attn2`` reads the text conditioning through ``to_k`` and ``to_v`` (``W``: out × d,
d = the text embedding width; SDXL: both encoders' states concatenated). With per-token text embeddings c (columns):

    W_new = argmin_W  s_e Σ_i ‖W c_i − W_old c*_i‖² + λ Σ_j ‖W c_j − W_old c_j‖² + μ ‖W − W_old‖²_F
          = W_old (s_e Σ_i c*_i c_iᵀ + λ Σ_j c_j c_jᵀ + μ I)(s_e Σ_i c_i c_iᵀ + λ Σ_j c_j c_jᵀ + μ I)⁻¹

(c_i erased tokens, c*_i their targets, c_j preserved tokens). The right factor ``X = M B⁻¹`` (d × d) is the same
for every layer, so it is solved once in float64 and every projection becomes ``W_old X``.

Tokens: for a prompt, positions 0 … its EOS token (``tokens="eos"``; for an erased/target pair, up to the later of
the two EOS positions, so the target's padding states are included where the erased prompt still has words), or
all positions (``tokens="all"``). Position 0 (BOS) is identical for every prompt in CLIP, so including it only adds
a preservation constraint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from metaunlearn.backbones.base import Backbone
from metaunlearn.errors import UserError

KV_PROJECTIONS = ("to_k", "to_v")


def cross_attention_projections(
    unet: torch.nn.Module, projections: Sequence[str] = KV_PROJECTIONS
) -> list[tuple[str, torch.nn.Linear]]:
    """``(name, Linear)`` of every cross-attention key/value projection (peft-wrapped layers resolve to the base)."""
    found = []
    for name, module in unet.named_modules():
        parent, _, leaf = name.rpartition(".")
        if leaf in projections and parent.endswith("attn2"):
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            if isinstance(base, torch.nn.Linear):
                found.append((name, base))
    if not found:
        raise UserError("the UNet has no cross-attention key/value projections (attn2.to_k/to_v) to edit")
    return found


def eos_positions(backbone: Backbone, prompts: Sequence[str]) -> list[int]:
    """Index of each prompt's EOS token (the largest over the pipeline's tokenizers)."""
    tokenizers = [t for t in (getattr(backbone.pipe, "tokenizer", None), getattr(backbone.pipe, "tokenizer_2", None)) if t]
    out = [0] * len(prompts)
    for tok in tokenizers:
        ids = tok(list(prompts), truncation=True, max_length=tok.model_max_length)["input_ids"]
        out = [max(o, len(i) - 1) for o, i in zip(out, ids)]
    return out


def prompt_states(backbone: Backbone, prompts: Sequence[str]) -> torch.Tensor:
    """Per-token embeddings the cross-attention reads: ``encode_prompts(...)["encoder_hidden_states"]`` [N, L, d]."""
    return backbone.encode_prompts(list(prompts))["encoder_hidden_states"].detach().to(torch.float64)


@dataclass
class TokenSet:
    """Columns for the least-squares edit: ``inputs`` [n, d] and their ``targets`` [n, d] (targets of preserved
    tokens are the tokens themselves)."""

    inputs: torch.Tensor
    targets: torch.Tensor

    @staticmethod
    def cat(sets: Sequence[TokenSet]) -> TokenSet:
        return TokenSet(torch.cat([s.inputs for s in sets]), torch.cat([s.targets for s in sets]))

    def __len__(self) -> int:
        return self.inputs.shape[0]


def erase_tokens(
    backbone: Backbone, prompts: Sequence[str], target_prompts: Sequence[str], tokens: str
) -> TokenSet:
    """Token pairs (erased prompt token, target prompt token at the same position)."""
    if len(target_prompts) == 1:
        target_prompts = list(target_prompts) * len(prompts)
    if len(target_prompts) != len(prompts):
        raise UserError(
            f"give one target prompt or one per erased prompt ({len(prompts)}), not {len(target_prompts)}"
        )
    states, targets = prompt_states(backbone, prompts), prompt_states(backbone, target_prompts)
    ins, outs = [], []
    eos, eos_t = eos_positions(backbone, prompts), eos_positions(backbone, target_prompts)
    for i in range(len(prompts)):
        n = states.shape[1] if tokens == "all" else min(max(eos[i], eos_t[i]) + 1, states.shape[1])
        ins.append(states[i, :n])
        outs.append(targets[i, :n])
    return TokenSet(torch.cat(ins), torch.cat(outs))


def preserve_tokens(backbone: Backbone, prompts: Sequence[str], tokens: str) -> TokenSet:
    """Tokens of the preserved prompts, each mapped to itself."""
    if not prompts:
        d = prompt_states(backbone, [""]).shape[-1]
        empty = torch.zeros(0, d, dtype=torch.float64, device=backbone.device)
        return TokenSet(empty, empty)
    states = prompt_states(backbone, prompts)
    eos = eos_positions(backbone, prompts)
    rows = [states[i] if tokens == "all" else states[i, : eos[i] + 1] for i in range(len(prompts))]
    flat = torch.cat(rows)
    return TokenSet(flat, flat)


def edit_factor(erase: TokenSet, preserve: TokenSet, erase_scale: float, preserve_scale: float, lamb: float) -> torch.Tensor:
    """``X = M B⁻¹`` (d × d, float64) so that ``W_new = W_old X`` for every projection (see the module docstring)."""
    d = erase.inputs.shape[1]
    eye = torch.eye(d, dtype=torch.float64, device=erase.inputs.device)
    ci, ti = erase.inputs, erase.targets
    cj = preserve.inputs
    m = erase_scale * ti.T @ ci + preserve_scale * cj.T @ cj + lamb * eye
    b = erase_scale * ci.T @ ci + preserve_scale * cj.T @ cj + lamb * eye
    eig = torch.linalg.eigvalsh(b)
    if float(eig[0]) <= 1e-10 * float(eig[-1]):
        raise torch.linalg.LinAlgError("the edit system is singular (or nearly so)")
    # X B = M  ⇔  Bᵀ Xᵀ = Mᵀ, and B is symmetric positive definite.
    return torch.linalg.solve(b, m.T).T


@torch.no_grad()
def apply_factor(layers: Sequence[tuple[str, torch.nn.Linear]], originals: Sequence[torch.Tensor], factor: torch.Tensor) -> None:
    """Set every projection's weight to ``W_old X``."""
    for (_, layer), w_old in zip(layers, originals):
        layer.weight.copy_((w_old.to(torch.float64) @ factor).to(layer.weight.dtype))
