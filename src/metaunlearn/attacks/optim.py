"""The attacker's optimizer and learning-rate schedule (torch optimizers, diffusers' schedulers)."""

from __future__ import annotations

import torch

from metaunlearn.attacks.run_spec import AttackSpec


def build_optimizer(params: list[torch.nn.Parameter], spec: AttackSpec, *, decay: bool = True) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD (with ``spec.momentum``) over ``params``; ``decay=False`` drops weight decay."""
    wd = spec.weight_decay if decay else 0.0
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=wd)
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=wd)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=wd)
    raise ValueError(f"Unknown optimizer: {spec.optimizer}")


def build_schedule(optimizer: torch.optim.Optimizer, spec: AttackSpec) -> torch.optim.lr_scheduler.LRScheduler:
    """``spec.schedule`` over the attack's whole run (every stage), via :func:`diffusers.optimization.get_scheduler`.

    ``constant`` ignores ``warmup_steps``; use ``constant_with_warmup`` for a warm-up to a constant lr.
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(spec.schedule, optimizer, num_warmup_steps=spec.warmup_steps,
                         num_training_steps=spec.steps)
