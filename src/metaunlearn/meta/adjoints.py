"""Adjoints (vector-Jacobian products) of one inner optimizer step, written out for the reverse pass.

One inner step maps ``(x_{k-1}, state_{k-1})`` to ``(x_k, state_k)`` given the clipped gradient ĝ_k. These classes
run that map backwards: given the adjoints of ``x_k`` and of the state after the step, they return the adjoint of ĝ_k
(which the caller turns into a Hessian-vector product) and update the adjoints of ``x`` and of the state in place to
those of ``x_{k-1}`` and ``state_{k-1}``. Everything is elementwise given ĝ, so the adjoints cost a few passes over
the parameters and no UNet evaluation.

AdamW (decoupled weight decay, bias correction; the same formulas as :class:`~metaunlearn.meta.inner_optim.InnerOptimizer`
and ``torch.optim.AdamW``)::

    m_k = β1 m_{k-1} + (1-β1) ĝ          v_k = β2 v_{k-1} + (1-β2) ĝ²
    x_k = (1 - lr·wd) x_{k-1} - c1 m_k / D_k,   c1 = lr / (1-β1^k),  D_k = √v_k / √(1-β2^k) + eps

SGD (L2 weight decay added to the clipped gradient, optional momentum with torch's first-step convention)::

    d_k = ĝ + wd x_{k-1};   b_k = d_k (k = 1) or μ b_{k-1} + d_k;   x_k = x_{k-1} - lr b_k

AdamW's reverse needs m_k and v_k: the caller replays the optimizer to state_{k-1} (bit-identical, from the
stored clipped gradients) and :meth:`AdamWAdjoint.step_back` advances it to state_k with ĝ_k. (Running the moment
recurrences backwards instead is exact only in exact arithmetic: where ĝ_k² ≫ v_{k-1} the rewound v_{k-1} is
rounding noise, and Adam's derivative there, ~1/eps², turns it into garbage.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from metaunlearn.meta.config import AttackConfig

Tensors = list[torch.Tensor]


def clip_coefficient(grads: Sequence[torch.Tensor], max_norm: float | None) -> tuple[float, float]:
    """``(coef, norm)`` of global-norm clipping as ``clip_grad_norm_``: ĝ = coef·g, coef = min(1, C / (‖g‖ + 1e-6))."""
    dtype = torch.promote_types(grads[0].dtype, torch.float32)
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=dtype) for g in grads])))
    if max_norm is None:
        return 1.0, norm
    return min(1.0, max_norm / (norm + 1e-6)), norm


def clip_adjoint_(u: Tensors, grads: Sequence[torch.Tensor], max_norm: float | None) -> None:
    """Turn ``u`` = adjoint of ĝ = clip(g) into the adjoint of g, in place.

    Where the clip is active (C / (‖g‖+δ) < 1): ā_g = c u − C (g·u) / ((‖g‖+δ)² ‖g‖) · g.
    """
    coef, norm = clip_coefficient(grads, max_norm)
    if max_norm is None or coef >= 1.0:
        return
    dot = float(sum(torch.vdot(g.reshape(-1), a.reshape(-1)) for g, a in zip(grads, u)))
    scale = max_norm * dot / ((norm + 1e-6) ** 2 * norm)
    torch._foreach_mul_(u, coef)
    torch._foreach_add_(u, list(grads), alpha=-scale)


class AdamWAdjoint:
    """Reverse of :class:`~metaunlearn.meta.inner_optim.InnerOptimizer`'s AdamW (see the module docstring).

    Holds the adjoints of m and v (two parameter copies). Each :meth:`step_back` works one parameter tensor at a
    time, so its temporaries are the size of the largest tensor, not of the model.
    """

    def __init__(self, config: AttackConfig, params: Tensors, steps: int) -> None:
        self.config = config
        self.k = steps
        self.adj_m = [torch.zeros_like(p) for p in params]
        self.adj_v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step_back(self, adj_x: Tensors, clipped: Tensors, exp_avg: Tensors, exp_avg_sq: Tensors) -> Tensors:
        """Reverse step k (counting down). ``exp_avg``/``exp_avg_sq`` hold m_{k-1}, v_{k-1} (left at m_k, v_k);
        ``adj_x`` becomes x_{k-1}'s adjoint (excluding the Hessian term); ``clipped`` (ĝ_k) is overwritten with
        its own adjoint ū, which is returned."""
        cfg, k = self.config, self.k
        b1, b2 = cfg.betas
        c1 = cfg.lr / (1 - b1**k)
        c2 = math.sqrt(1 - b2**k)
        decay = 1 - cfg.lr * cfg.weight_decay
        for ax, g, m, v, am, av in zip(adj_x, clipped, exp_avg, exp_avg_sq, self.adj_m, self.adj_v):
            m.lerp_(g, 1 - b1)  # m_k, v_k as the forward step computed them
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            # s = √(v + tiny) (a finite derivative where v = 0, as in the full unroll), D = s / c2 + eps
            s = v.add(torch.finfo(v.dtype).tiny).sqrt_()
            denom = s.div(c2).add_(cfg.eps)
            am.addcdiv_(ax, denom, value=-c1)  # ā_m += ā_x · (−c1 / D)
            denom.square_().mul_(s)
            del s
            av.addcdiv_(ax * m, denom, value=c1 / (2 * c2))  # ā_v += ā_x · c1 m / (D² · c2 · 2 s)
            del denom
            g.mul_(av).mul_(2 * (1 - b2)).add_(am, alpha=1 - b1)  # ū = (1−β1) ā_m + 2 (1−β2) ĝ ā_v
            am.mul_(b1)
            av.mul_(b2)
            if cfg.weight_decay:
                ax.mul_(decay)
        self.k -= 1
        return clipped


class SGDAdjoint:
    """Reverse of SGD (+momentum, L2 weight decay); it needs no optimizer state, the step being linear in ĝ."""

    def __init__(self, config: AttackConfig, params: Tensors, steps: int) -> None:
        self.config = config
        self.k = steps
        self.adj_b = [torch.zeros_like(p) for p in params] if config.momentum > 0 else None

    @torch.no_grad()
    def step_back(self, adj_x: Tensors, clipped: Tensors, *state: Tensors) -> Tensors:
        cfg = self.config
        if self.adj_b is not None:
            torch._foreach_add_(self.adj_b, adj_x, alpha=-cfg.lr)  # ā_b_k
            torch._foreach_copy_(clipped, self.adj_b)  # ā_d_k
            torch._foreach_mul_(self.adj_b, cfg.momentum)  # ā_b_{k-1}
        else:
            for u, ax in zip(clipped, adj_x):
                torch.mul(ax, -cfg.lr, out=u)
        if cfg.weight_decay:
            torch._foreach_add_(adj_x, clipped, alpha=cfg.weight_decay)
        self.k -= 1
        return clipped


def optimizer_adjoint(config: AttackConfig, optimizer, steps: int) -> AdamWAdjoint | SGDAdjoint:
    """The adjoint of ``optimizer`` (an :class:`~metaunlearn.meta.inner_optim.InnerOptimizer` after ``steps``)."""
    if config.optimizer == "adamw":
        return AdamWAdjoint(config, optimizer.params, steps)
    return SGDAdjoint(config, optimizer.params, steps)
