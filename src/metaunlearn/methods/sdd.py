"""SDD — Towards Safe Self-Distillation of Internet-Scale Text-to-Image Diffusion Models (Kim et al., 2023).

The conditional prediction is pulled onto the model's own unconditional prediction (stop-gradient):

    L = ‖ε_θ(x_t, c) − sg[ε_θ(x_t, ∅)]‖²

with x_t drawn by an EMA teacher (EMA of the student, decay ``ema_decay``) with CFG ``guidance``, ``stop`` DDIM
steps down the chain (``stop`` uniform among the DDIM steps). ``target: ema`` takes the unconditional target from
the EMA teacher instead of the student. Defaults: cross-attention trained, lr 1e-5, decay 0.999, guidance 3.

The EMA holds only the trained subset; it is updated after every optimizer step (:meth:`SddLoss.after_step`) and
is part of the checkpoint state so a resumed run is bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field

from metaunlearn.backbones.base import TRAINABLE_SUBSETS, cond_index
from metaunlearn.config import StrictModel
from metaunlearn.methods.base import BaseLoss, Method, SwappedUNet, UnlearnInputs, frozen_copy, mse
from metaunlearn.methods.sampling import PartialDDIMSampler


class SddConfig(StrictModel):
    """SDD hyperparameters."""

    trainable: Literal[TRAINABLE_SUBSETS] = Field("xattn", description="UNet subset trained")  # type: ignore[valid-type]
    ema_decay: float = Field(0.999, ge=0, le=1, description="EMA decay of the sampling teacher")
    ddim_steps: int = Field(50, ge=1, description="DDIM chain length used to draw x_t")
    guidance: float = Field(3.0, ge=0, description="CFG scale of the EMA teacher while drawing x_t")
    target: Literal["student", "ema"] = Field("student", description="whose ε(x_t, ∅) is the stop-gradient target")
    batch_size: int = Field(1, ge=1, description="prompts (drawn with replacement) per step")


class SddLoss:
    """The per-step SDD loss (see the module docstring)."""

    def __init__(self, inputs: UnlearnInputs, config: SddConfig, trainable_subset: str) -> None:
        self.backbone = inputs.backbone
        self.config = config
        self.trainable_subset = trainable_subset
        self.params = [p for _, p in self.backbone.named_trainable(trainable_subset)]
        self.ema = frozen_copy(self.params)
        self.teacher = SwappedUNet(self.backbone.unet, self.ema)
        self.cond = self.backbone.encode_prompts(inputs.forget_prompts)
        self.null = self.backbone.null_cond(1)
        self.sampler = PartialDDIMSampler(self.backbone, config.ddim_steps, config.guidance)

    def __call__(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        n_prompts = next(iter(self.cond.values())).shape[0]
        index = torch.randint(0, n_prompts, (self.config.batch_size,), generator=generator)
        cond = cond_index(self.cond, index.to(self.backbone.device))
        null = {k: v.expand(len(index), *v.shape[1:]) for k, v in self.null.items()}
        stop = self.sampler.draw_stop(generator)
        x_t, t = self.sampler.sample(cond, null, stop, generator, unet=self.teacher)
        with torch.no_grad():
            target_net = self.teacher if self.config.target == "ema" else None
            target = self.backbone.predict_noise(x_t, t, null, unet=target_net)
        pred = self.backbone.predict_noise(x_t, t, cond)
        loss = mse(pred, target)
        return loss, {"sdd": float(loss.detach())}

    @torch.no_grad()
    def after_step(self) -> None:
        """ema ← decay·ema + (1 − decay)·θ."""
        ema = list(self.ema.values())
        torch._foreach_lerp_(ema, [p.detach() for p in self.params], 1.0 - self.config.ema_decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": v for i, v in enumerate(self.ema.values())}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for i, v in enumerate(self.ema.values()):
            v.copy_(state[f"ema.{i}"])


class SDD(Method):
    """SDD as a loss method."""

    name = "sdd"
    Config = SddConfig
    kind = "loss"
    default_lr = 1e-5

    @property
    def trainable_subset(self) -> str:
        return self.config.trainable

    def apply(self, inputs: UnlearnInputs) -> BaseLoss:
        return SddLoss(inputs, self.config, self.resolve_subset(inputs))
