"""Exact meta gradient through the simulated attack by a full unroll (``meta.order: second_unrolled``): the
reference the scalable reverse mode (:mod:`metaunlearn.meta.reverse`) is tested against; small models only.

θ' = A(θ) is unrolled functionally: the attacked parameters are carried as tensors in the autograd graph
(``torch.func.functional_call`` via :class:`~metaunlearn.methods.base.SwappedUNet`), every inner gradient is taken
with ``create_graph=True``, and the SGD or AdamW update (and the global-norm clip) is written with differentiable
ops. Back-propagating the ascent terms at θ' then yields d/dθ of L(A(θ)), Jacobian of the attack included.
With ``points`` the ascent terms are taken at several inner iterates θ_k (their mean), each differentiated through
the first k steps; a ``radius`` attack's rescaled step is differentiated too.
Memory grows with the number of inner steps (every step's activations and double-backward graph stay alive); use it
on the toy model or tiny pipelines. Attention runs on
PyTorch's math SDPA backend here, the fused kernels having no double backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from metaunlearn.backbones.base import Backbone
from metaunlearn.data.cache import CachedSet
from metaunlearn.meta.config import AttackConfig
from metaunlearn.meta.plan import Draw, OuterTerm
from metaunlearn.methods.base import SwappedUNet
from metaunlearn.training.parallel import SINGLE, Shard


def _to_radius(direction: list[torch.Tensor], radius: float) -> list[torch.Tensor]:
    """``radius · direction / ‖direction‖`` (differentiable)."""
    total = torch.sqrt(sum((d * d).sum() for d in direction))
    return [radius * d / total for d in direction]


def _clip(grads: list[torch.Tensor], max_norm: float | None) -> list[torch.Tensor]:
    if max_norm is None:
        return grads
    total = torch.sqrt(sum((g * g).sum() for g in grads))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g * coef for g in grads]


def _local_loss(backbone: Backbone, draw: Draw, data: CachedSet, net, shard: Shard, autocast):
    """This process's share of the batch loss (``None`` when none of its rows fell here) and its value."""
    total, value = None, 0.0
    for part, share in draw.shares(shard):
        with autocast():
            loss = part.loss(backbone, data, unet=net)
        if share != 1.0:
            loss = share * loss
        total = loss if total is None else total + loss
        value += float(loss.detach())
    return total, value


def unrolled_attack(
    backbone: Backbone,
    config: AttackConfig,
    params: Sequence[torch.nn.Parameter],
    draws: Sequence[Draw],
    data: CachedSet,
    autocast=nullcontext,
    shard: Shard = SINGLE,
    visit: Callable[[int, list[torch.Tensor]], None] | None = None,
) -> tuple[list[torch.Tensor], list[float]]:
    """θ' as differentiable functions of ``params`` (which must require grad), and the inner losses (this
    process's shares). With several processes the inner gradients are summed across them inside the graph.
    ``visit(k, θ_k)`` sees every iterate (k = 1..len(draws))."""
    current = list(params)
    m = [torch.zeros_like(p) for p in params] if config.optimizer == "adamw" else None
    v = [torch.zeros_like(p) for p in params] if config.optimizer == "adamw" else None
    buf: list[torch.Tensor] | None = None
    losses = []
    for k, draw in enumerate(draws, start=1):
        net = SwappedUNet(backbone.unet, dict(zip(params, current)))
        loss, value = _local_loss(backbone, draw, data, net, shard, autocast)
        if loss is None:  # no rows here: a zero that stays in the graph, so the backward collectives line up
            grads = [c * 0.0 for c in current]
        else:
            grads = torch.autograd.grad(loss, current, create_graph=True, allow_unused=True, materialize_grads=True)
        grads = _clip(shard.sum_differentiable(grads), config.clip_grad_norm)
        losses.append(value)
        if config.optimizer == "adamw":
            b1, b2 = config.betas
            m = [b1 * mi + (1 - b1) * g for mi, g in zip(m, grads)]
            v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(v, grads)]
            step = config.lr / (1 - b1**k)
            root2 = math.sqrt(1 - b2**k)
            # sqrt(v + tiny) instead of sqrt(v): the same value, but a finite derivative where a parameter's inner
            # gradients are all exactly zero (d sqrt(v)/dv = inf at 0 would turn 0·inf into NaN)
            denom = [torch.sqrt(vi + torch.finfo(vi.dtype).tiny) / root2 + config.eps for vi in v]
            if config.radius is not None:
                direction = [mi / di for mi, di in zip(m, denom)]
                current = [p - u for p, u in zip(current, _to_radius(direction, config.radius))]
            else:
                current = [
                    p * (1 - config.lr * config.weight_decay) - step * mi / di for p, mi, di in zip(current, m, denom)
                ]
        else:
            if config.weight_decay and config.radius is None:
                grads = [g + config.weight_decay * p for g, p in zip(grads, current)]
            if config.momentum > 0:
                buf = grads if buf is None else [config.momentum * b + g for b, g in zip(buf, grads)]
                grads = buf
            if config.radius is not None:
                current = [p - u for p, u in zip(current, _to_radius(grads, config.radius))]
            else:
                current = [p - config.lr * g for p, g in zip(current, grads)]
        if visit is not None:
            visit(k, current)
    return current, losses


def second_order_ascent(
    backbone: Backbone,
    config: AttackConfig,
    attack_params: Sequence[torch.nn.Parameter],
    outer_params: Sequence[torch.nn.Parameter],
    draws: Sequence[Draw],
    train: CachedSet,
    ascent: Sequence[OuterTerm],
    autocast=nullcontext,
    shard: Shard = SINGLE,
    *,
    points: Sequence[int] | None = None,
) -> dict[str, float]:
    """Accumulate ``∇_θ mean_k Σ score(L(θ_k; D))`` of the outer terms (exact; an ascent term scores ``−β·B(L)``)
    into the outer parameters' ``.grad`` (this process's share) over the inner steps k in ``points`` (default: the
    end only, θ' = θ_M); return logged values (this process's shares; a bounded term split across processes is
    scored at the whole batch's loss, :meth:`~metaunlearn.meta.plan.OuterTerm.split_slope`)."""
    outer_ids = {id(p) for p in outer_params}
    points = list(points) if points is not None else [len(draws)]
    total: list = [0.0]
    last: list = [None]
    sums: dict[str, float] = {}

    def ascend(k: int, current: list[torch.Tensor]) -> None:
        last[0] = current
        if k not in points:
            return
        net = SwappedUNet(backbone.unet, dict(zip(attack_params, current)))
        for term in ascent:
            slope = term.split_slope(backbone, shard, autocast, unet=net)
            loss, value = _local_loss(backbone, term.draw, term.data, net, shard, autocast)
            if loss is not None:
                total[0] = total[0] + (term.score(loss) if slope is None else slope * loss) / len(points)
            sums[term.name] = sums.get(term.name, 0.0) + value

    for p in attack_params:
        p.requires_grad_(True)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            _, losses = unrolled_attack(backbone, config, attack_params, draws, train, autocast, shard, visit=ascend)
            terms: dict[str, float] = {"attack_first": losses[0], "attack_last": losses[-1]} if losses else {}
            terms.update({name: value / len(points) for name, value in sums.items()})
            if shard.distributed and ascent and draws and not torch.is_tensor(total[0]):
                # no ascent rows here: still run the backward, whose inner all-reduces the other processes wait on
                total[0] = 0.0 * sum(c.sum() for c in last[0])
            if torch.is_tensor(total[0]):
                total[0].backward()
    finally:
        for p in attack_params:
            if id(p) not in outer_ids:
                p.requires_grad_(False)
                p.grad = None
    return terms
