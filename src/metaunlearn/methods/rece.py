"""RECE — Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models (Gong et al., ECCV 2024).

Start with a UCE edit (``W = W_old X``). Then, for ``epochs`` rounds, find in closed form the embedding c′ that
best regenerates the erased concept under the *edited* projections,

    c′ = argmin_c′ Σ_layers ‖W c′ − W_old c‖² + ρ‖c′‖²  =  (Xᵀ G X + ρ I)⁻¹ Xᵀ G c,   G = Σ_layers W_oldᵀ W_old,

token by token for every erased prompt token c (ρ = ``adv_reg`` × the mean eigenvalue of XᵀGX, so the same value
means the same on every model size), add those c′ to the erased set (with the erased tokens' targets) and solve
the UCE system again from the original weights, the preserved prompts' constraints keeping benign concepts.
``derive_from`` chooses the projections in the sum (keys and values, or values only).

The edit records, per epoch, how well the derived embedding still regenerates the concept before it is erased
(``regen_<epoch>``: relative residual ‖W c′ − W_old c‖² / ‖W_old c‖², low = a working adversarial embedding).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from metaunlearn.methods import closed_form as cf
from metaunlearn.methods.base import UnlearnInputs
from metaunlearn.methods.uce import UCE, UceConfig, UceEdit


class ReceConfig(UceConfig):
    """RECE hyperparameters: UCE's plus the adversarial-embedding rounds."""

    epochs: int = Field(3, ge=0, description="rounds of derive-then-erase after the initial UCE edit")
    adv_reg: float = Field(0.1, gt=0, description="ρ relative to the mean eigenvalue of XᵀGX")
    derive_from: Literal["kv", "v"] = Field("kv", description="projections summed when deriving c′")


def derive_embeddings(
    concept: torch.Tensor, factor: torch.Tensor, gram: torch.Tensor, adv_reg: float
) -> tuple[torch.Tensor, float]:
    """``(c′ rows, relative residual)`` for concept token rows under ``W = W_old X`` (``gram`` = G)."""
    d = factor.shape[0]
    a = factor.T @ gram @ factor
    rho = adv_reg * torch.trace(a) / d
    proj = torch.linalg.solve(a + rho * torch.eye(d, dtype=a.dtype, device=a.device), factor.T @ gram)
    derived = concept @ proj.T
    diff = derived @ factor.T - concept  # rows of X c′ − c; ‖W_old(X c′ − c)‖² = diffᵀ G diff
    residual = torch.einsum("nd,de,ne->", diff, gram, diff) / torch.einsum("nd,de,ne->", concept, gram, concept)
    return derived, float(residual)


class RECE(UCE):
    """RECE as an edit method: UCE's edit, then derived embeddings erased in turn."""

    name = "rece"
    Config = ReceConfig

    def apply(self, inputs: UnlearnInputs) -> None:
        edit = UceEdit(inputs.backbone, inputs, self.config)
        factor = edit.apply()
        names = ("to_v",) if self.config.derive_from == "v" else cf.KV_PROJECTIONS
        gram = sum(
            w.to(torch.float64).T @ w.to(torch.float64)
            for (name, _), w in zip(edit.layers, edit.originals)
            if name.rpartition(".")[2] in names
        )
        extra: list[cf.TokenSet] = []
        self.edit_stats = {}
        for epoch in range(self.config.epochs):
            derived, residual = derive_embeddings(edit.erase.inputs, factor, gram, self.config.adv_reg)
            self.edit_stats[f"regen_{epoch}"] = residual
            extra.append(cf.TokenSet(derived, edit.erase.targets))
            factor = edit.apply(cf.TokenSet.cat(extra))
        return None
