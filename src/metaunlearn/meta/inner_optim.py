"""The simulated attack's optimizer: AdamW or SGD over a fixed parameter list, state allocated once.

The official code builds a fresh ``torch.optim.AdamW`` every outer step (allocating two UNet-sized state buffers
each time). Here the state buffers are allocated once and zeroed by :meth:`InnerOptimizer.reset`, which gives the
same "fresh state every outer step" semantics. The update is torch's AdamW / SGD algorithm on ``torch._foreach_*``
ops (checked against ``torch.optim.AdamW`` in the tests), with torch's global-norm gradient clipping.

With ``radius`` set (a normalised-step attacker) the update is the optimizer's direction — SGD: the gradient or
momentum buffer; AdamW: m̂ / (√v̂ + ε) — rescaled to global L2 norm ``radius``; lr and weight decay are unused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from metaunlearn.meta.config import AttackConfig


def clip_by_global_norm_(grads: Sequence[torch.Tensor], max_norm: float | None) -> float:
    """Scale ``grads`` in place so their joint L2 norm is at most ``max_norm`` (as ``clip_grad_norm_``); return
    the norm before clipping."""
    norms = torch._foreach_norm(list(grads))
    dtype = torch.promote_types(grads[0].dtype, torch.float32)  # half precision upcast; float64 stays float64
    total = torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))
    if max_norm is not None:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(list(grads), coef.to(grads[0].dtype))
    return float(total)


class InnerOptimizer:
    """AdamW (decoupled weight decay) or SGD (optional momentum, L2 weight decay) with preallocated state."""

    def __init__(self, params: Sequence[torch.Tensor], config: AttackConfig) -> None:
        self.params = list(params)
        self.config = config
        self.step_count = 0
        self._allocate()

    def _allocate(self) -> None:
        if self.config.optimizer == "adamw":
            self.exp_avg = [torch.zeros_like(p) for p in self.params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        elif self.config.momentum > 0:
            self.momentum = [torch.zeros_like(p) for p in self.params]
        self.allocated = True

    def state(self) -> list[list[torch.Tensor]]:
        """The state buffers (AdamW: m, v; SGD with momentum: the momentum buffer)."""
        if self.config.optimizer == "adamw":
            return [self.exp_avg, self.exp_avg_sq]
        return [self.momentum] if self.config.momentum > 0 else []

    def release(self) -> None:
        """Free the state buffers until the next :meth:`reset` (which allocates them again)."""
        for name in ("exp_avg", "exp_avg_sq", "momentum"):
            if hasattr(self, name):
                delattr(self, name)
        self.allocated = False

    def reset(self, config: AttackConfig | None = None) -> None:
        """Zero the state (a fresh optimizer), optionally switching hyperparameters of the same optimizer kind."""
        if config is not None:
            self.config = config
        self.step_count = 0
        if not self.allocated:
            self._allocate()
            return
        for buffers in self.state():
            torch._foreach_zero_(buffers)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        """One update. ``grads`` are consumed: AdamW reuses them as scratch space for its denominator, so the
        optimizer needs no memory beyond its two moment buffers."""
        cfg = self.config
        self.step_count += 1
        params, grads = self.params, list(grads)
        if cfg.optimizer == "adamw":
            beta1, beta2 = cfg.betas
            if cfg.weight_decay and cfg.radius is None:
                torch._foreach_mul_(params, 1 - cfg.lr * cfg.weight_decay)
            torch._foreach_lerp_(self.exp_avg, grads, 1 - beta1)
            torch._foreach_mul_(self.exp_avg_sq, beta2)
            torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1 - beta2)
            bias1 = 1 - beta1**self.step_count
            bias2 = 1 - beta2**self.step_count
            denom = grads  # no longer needed: reuse as scratch
            torch._foreach_copy_(denom, self.exp_avg_sq)
            torch._foreach_sqrt_(denom)
            torch._foreach_div_(denom, math.sqrt(bias2))
            torch._foreach_add_(denom, cfg.eps)
            if cfg.radius is not None:
                direction = torch._foreach_div(self.exp_avg, denom)
                _radius_step_(params, direction, cfg.radius)
                return
            torch._foreach_addcdiv_(params, self.exp_avg, denom, -cfg.lr / bias1)
            return
        if cfg.weight_decay and cfg.radius is None:
            grads = torch._foreach_add(grads, params, alpha=cfg.weight_decay)
        if cfg.momentum > 0:
            if self.step_count == 1:
                torch._foreach_copy_(self.momentum, grads)
            else:
                torch._foreach_mul_(self.momentum, cfg.momentum)
                torch._foreach_add_(self.momentum, grads)
            grads = self.momentum
        if cfg.radius is not None:
            _radius_step_(params, grads, cfg.radius)
            return
        torch._foreach_add_(params, grads, alpha=-cfg.lr)


def _radius_step_(params: list[torch.Tensor], direction: list[torch.Tensor], radius: float) -> None:
    """``params -= radius · direction / ‖direction‖`` (global L2 norm; no step when the direction is zero)."""
    norms = torch._foreach_norm(direction)
    total = torch.linalg.vector_norm(torch.stack([n.double() for n in norms]))
    if float(total) > 0:
        torch._foreach_add_(params, direction, alpha=-radius / float(total))
