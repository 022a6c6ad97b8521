"""Exact meta gradient through the simulated attack by a full unroll (``meta.order: second_unrolled``): the
reference the scalable reverse mode (:mod:`metaunlearn.meta.reverse`) is tested against; small models only.

θ' = A(θ) is unrolled functionally: the attacked parameters are carried as tensors in the autograd graph
(``torch.func.functional_call`` via :class:`~metaunlearn.methods.base.SwappedUNet`), every inner gradient is taken
with ``create_graph=True``, and the SGD or AdamW update (and the global-norm clip) is written with differentiable
ops. Back-propagating the ascent terms at θ' then yields d/dθ of L(A(θ)), Jacobian of the attack included.
Memory grows with the number of inner steps (every step's activations and double-backward graph stay alive); use it
on the toy model or tiny pipelines. Attention runs on
PyTorch's math SDPA backend here, the fused kernels having no double backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from metaunlearn.backbones.base import Backbone
from metaunlearn.data.cache import CachedSet
from metaunlearn.meta.config import AttackConfig
from metaunlearn.meta.plan import Draw
from metaunlearn.methods.base import SwappedUNet
from metaunlearn.training.parallel import SINGLE, Shard


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
) -> tuple[list[torch.Tensor], list[float]]:
    """θ' as differentiable functions of ``params`` (which must require grad), and the inner losses (this
    process's shares). With several processes the inner gradients are summed across them inside the graph."""
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
            current = [
                p * (1 - config.lr * config.weight_decay)
                - step * mi / (torch.sqrt(vi + torch.finfo(vi.dtype).tiny) / root2 + config.eps)
                for p, mi, vi in zip(current, m, v)
            ]
        else:
            if config.weight_decay:
                grads = [g + config.weight_decay * p for g, p in zip(grads, current)]
            if config.momentum > 0:
                buf = grads if buf is None else [config.momentum * b + g for b, g in zip(buf, grads)]
                grads = buf
            current = [p - config.lr * g for p, g in zip(current, grads)]
    return current, losses


def second_order_ascent(
    backbone: Backbone,
    config: AttackConfig,
    attack_params: Sequence[torch.nn.Parameter],
    outer_params: Sequence[torch.nn.Parameter],
    draws: Sequence[Draw],
    train: CachedSet,
    ascent: Sequence[tuple[str, float, Draw, CachedSet]],
    autocast=nullcontext,
    shard: Shard = SINGLE,
) -> dict[str, float]:
    """Accumulate ``−Σ β ∇_θ L(A(θ); D)`` (exact) into the outer parameters' ``.grad`` (this process's share);
    return logged values (this process's shares)."""
    outer_ids = {id(p) for p in outer_params}
    for p in attack_params:
        p.requires_grad_(True)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            current, losses = unrolled_attack(backbone, config, attack_params, draws, train, autocast, shard)
            net = SwappedUNet(backbone.unet, dict(zip(attack_params, current)))
            total = 0.0
            terms: dict[str, float] = {"attack_first": losses[0], "attack_last": losses[-1]} if losses else {}
            for role, weight, draw, data in ascent:
                loss, value = _local_loss(backbone, draw, data, net, shard, autocast)
                if loss is not None:
                    total = total - weight * loss
                terms[f"ascent_{role}"] = value
            if shard.distributed and ascent and draws and not torch.is_tensor(total):
                # no ascent rows here: still run the backward, whose inner all-reduces the other processes wait on
                total = 0.0 * sum(c.sum() for c in current)
            if torch.is_tensor(total):
                total.backward()
    finally:
        for p in attack_params:
            if id(p) not in outer_ids:
                p.requires_grad_(False)
                p.grad = None
    return terms
