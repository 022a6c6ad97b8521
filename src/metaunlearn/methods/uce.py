"""UCE — Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024).

A closed-form edit of every cross-attention ``to_k``/``to_v`` weight: the erased prompts' token embeddings are
mapped to the original outputs of a target prompt (default: the empty prompt, i.e. "show what you would show for
nothing"; or a user-given concept such as "a person"), the preserved prompts' outputs are kept, and μ‖W − W_old‖²
keeps everything else close (the math lives in :mod:`metaunlearn.methods.closed_form`). Works unchanged on SD-1.x,
SD-2.x, SDXL (whose K/V read both encoders' concatenated states) and the toy model. SDXL's pooled text embedding
enters through the time embedding, not cross-attention, and is left as it is (as in the official UCE).

After the edit, the meta stage (if any) trains ``trainable`` (default: the full UNet) with meta terms only.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from metaunlearn.backbones.base import TRAINABLE_SUBSETS, Backbone
from metaunlearn.config import StrictModel
from metaunlearn.errors import UserError
from metaunlearn.methods import closed_form as cf
from metaunlearn.methods.base import Method, UnlearnInputs


class UceConfig(StrictModel):
    """UCE hyperparameters."""

    target_prompts: list[str] = Field(default_factory=lambda: [""], description="one, or one per forget prompt")
    erase_scale: float = Field(1.0, gt=0, description="s_e, weight of the erase constraints")
    preserve_scale: float = Field(1.0, ge=0, description="λ, weight of the preserved prompts' constraints")
    lamb: float = Field(0.1, ge=0, description="μ, ridge weight pulling W toward W_old")
    tokens: Literal["eos", "all"] = Field("eos", description="token positions used: up to EOS, or all")
    trainable: Literal[TRAINABLE_SUBSETS] = Field("full", description="subset trained by a meta stage afterwards")  # type: ignore[valid-type]


def solve_factor(erase: cf.TokenSet, preserve: cf.TokenSet, config: UceConfig) -> torch.Tensor:
    """The shared right factor X, with a one-line error when the system is singular."""
    try:
        return cf.edit_factor(erase, preserve, config.erase_scale, config.preserve_scale, config.lamb)
    except torch.linalg.LinAlgError:
        raise UserError("UCE system is singular: use lamb > 0 or more erase/preserve prompts") from None


class UceEdit:
    """The erase/preserve token sets and the layers of one backbone, so RECE can iterate on them."""

    def __init__(self, backbone: Backbone, inputs: UnlearnInputs, config: UceConfig) -> None:
        self.config = config
        self.layers = cf.cross_attention_projections(backbone.unet)
        self.originals = [layer.weight.detach().clone() for _, layer in self.layers]
        self.erase = cf.erase_tokens(backbone, inputs.forget_prompts, config.target_prompts, config.tokens)
        self.preserve = cf.preserve_tokens(backbone, inputs.preserve_prompts, config.tokens)

    def apply(self, extra_erase: cf.TokenSet | None = None) -> torch.Tensor:
        """Solve with the base erase set (plus ``extra_erase``) from the original weights; return X."""
        erase = self.erase if extra_erase is None else cf.TokenSet.cat([self.erase, extra_erase])
        factor = solve_factor(erase, self.preserve, self.config)
        cf.apply_factor(self.layers, self.originals, factor)
        return factor


class UCE(Method):
    """UCE as an edit method."""

    name = "uce"
    Config = UceConfig
    kind = "edit"
    default_lr = 1e-5

    @property
    def trainable_subset(self) -> str:
        return self.config.trainable

    def apply(self, inputs: UnlearnInputs) -> None:
        UceEdit(inputs.backbone, inputs, self.config).apply()
        return None
