"""ESD — Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023).

The student ε_θ is regressed onto a negatively guided target from the frozen original model ε*:

    L = ‖ε_θ(x_t, c) − [ε*(x_t, ∅) − η (ε*(x_t, c) − ε*(x_t, ∅))]‖²

where x_t is produced by the *student* itself (no gradient) from pure noise, ``stop`` guided DDIM steps down the
chain under prompt c, ``stop`` uniform among the DDIM steps (as the official code). The variant chooses the trained
subset: ESD-u (``noxattn``, the paper's choice for nudity), ESD-x (``xattn``, for artistic styles), ESD-f
(``full``). Defaults follow the official SD-1.4 scripts: lr 1e-5, η = 1 (the paper also uses 3), 50 DDIM steps,
start guidance 3, one prompt per step.

The frozen teacher stores only the trained subset (the stage may override the variant's subset) (the rest of the UNet is shared with the student and never
changes), evaluated through :class:`~metaunlearn.methods.base.SwappedUNet`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field

from metaunlearn.backbones.base import Cond, cond_cat, cond_index
from metaunlearn.config import StrictModel
from metaunlearn.methods.base import BaseLoss, Method, SwappedUNet, UnlearnInputs, frozen_copy, mse
from metaunlearn.methods.sampling import PartialDDIMSampler

ESD_VARIANTS = {"u": "noxattn", "x": "xattn", "f": "full"}


class EsdConfig(StrictModel):
    """ESD hyperparameters (defaults: the official SD-1.4 scripts)."""

    variant: Literal["u", "x", "f"] = Field("u", description="ESD-u (non-cross-attn), ESD-x (cross-attn), ESD-f (all)")
    eta: float = Field(1.0, ge=0, description="negative guidance η in the target (paper: 1 and 3)")
    ddim_steps: int = Field(50, ge=1, description="DDIM chain length used to draw x_t")
    start_guidance: float = Field(3.0, ge=0, description="CFG scale of the student while drawing x_t")
    batch_size: int = Field(1, ge=1, description="prompts (drawn with replacement) per step")


class EsdLoss:
    """The per-step ESD loss (see the module docstring)."""

    def __init__(self, inputs: UnlearnInputs, config: EsdConfig, trainable_subset: str) -> None:
        self.backbone = inputs.backbone
        self.config = config
        self.trainable_subset = trainable_subset
        unet = self.backbone.unet
        params = [p for _, p in self.backbone.named_trainable(self.trainable_subset)]
        self.teacher = SwappedUNet(unet, frozen_copy(params))
        self.cond = self.backbone.encode_prompts(inputs.forget_prompts)
        self.null = self.backbone.null_cond(1)
        self.sampler = PartialDDIMSampler(self.backbone, config.ddim_steps, config.start_guidance)

    def target(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """``ε*(x_t,∅) − η[ε*(x_t,c) − ε*(x_t,∅)]`` from the frozen teacher."""
        n = x_t.shape[0]
        null = {k: v.expand(n, *v.shape[1:]) for k, v in self.null.items()}
        with torch.no_grad():
            both = self.backbone.predict_noise(
                torch.cat([x_t, x_t]), torch.cat([t, t]), cond_cat([null, cond]), unet=self.teacher
            )
        eps_null, eps_cond = both.chunk(2)
        return eps_null - self.config.eta * (eps_cond - eps_null)

    def __call__(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        n_prompts = next(iter(self.cond.values())).shape[0]
        index = torch.randint(0, n_prompts, (self.config.batch_size,), generator=generator)
        cond = cond_index(self.cond, index.to(self.backbone.device))
        null = {k: v.expand(len(index), *v.shape[1:]) for k, v in self.null.items()}
        stop = self.sampler.draw_stop(generator)
        x_t, t = self.sampler.sample(cond, null, stop, generator)  # the student draws x_t
        target = self.target(x_t, t, cond)
        pred = self.backbone.predict_noise(x_t, t, cond)
        loss = mse(pred, target)
        return loss, {"esd": float(loss.detach())}

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        pass


class ESD(Method):
    """ESD as a loss method."""

    name = "esd"
    Config = EsdConfig
    kind = "loss"
    default_lr = 1e-5

    @property
    def trainable_subset(self) -> str:
        return ESD_VARIANTS[self.config.variant]

    def apply(self, inputs: UnlearnInputs) -> BaseLoss:
        return EsdLoss(inputs, self.config, self.resolve_subset(inputs))
