"""How numbers read in reports and on the console: learning rates as ``1e-4``, ``mean ± std`` only over several seeds."""

from __future__ import annotations

import math
from collections.abc import Iterable

LEGACY_VARIANTS = {"unlearn": "plain"}
"""Variant names written by earlier versions, read as today's (a model without the meta objective is ``plain``)."""


def format_lr(lr: float) -> str:
    """A learning rate as people write it: ``1e-4``, ``3e-4``, ``2.5e-5`` (``0`` stays ``0``)."""
    if lr == 0 or not math.isfinite(lr):
        return f"{lr:g}"
    mantissa, exponent = f"{lr:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def attack_label(mode: str, lr: float) -> str:
    """``full lr 1e-4``."""
    return f"{mode} lr {format_lr(lr)}"


def percent(mean: float | None, std: float | None = None, n: int = 1) -> str:
    """``42.0`` for one seed, ``42.0 ± 3.1`` for several; ``—`` when there is no finite value."""
    if mean is None or not math.isfinite(mean):
        return "—"
    if n < 2 or std is None or not math.isfinite(std):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def mean_std(mean: float, std: float | None, n: int, digits: str = ".4g") -> str:
    """``mean`` alone for one seed, ``mean ± std`` for several (any unit)."""
    if n < 2 or std is None:
        return format(mean, digits)
    return f"{format(mean, digits)} ± {format(std, '.2g')}"


def seeds_phrase(counts: Iterable[int]) -> str:
    """What a cell holds, from the seed counts of its cells: ``one seed``, ``mean ± std over 3 seeds``, or mixed."""
    ns = sorted(set(counts))
    if not ns or ns == [1]:
        return "one seed"
    if len(ns) == 1:
        return f"mean ± std over {ns[0]} seeds"
    return "mean ± std over seeds (a value alone where only one seed ran)"


def canonical_variant(variant: str) -> str:
    """Today's name of a variant (``unlearn`` from older result files reads as ``plain``)."""
    return LEGACY_VARIANTS.get(variant, variant)
