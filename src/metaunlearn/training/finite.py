"""Finite checks of a training run: which tensor went NaN or inf, and the one-line messages that stop the run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch


def state_tensors(obj: Any, path: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor inside a (nested) state dict, with its path."""
    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in state_tensors(v, f"{path}.{k}" if path else str(k))]
    if isinstance(obj, (list, tuple)):
        return [t for i, v in enumerate(obj) for t in state_tensors(v, f"{path}.{i}" if path else str(i))]
    return []


def first_nonfinite(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating tensor holding NaN or inf (one device sync for all of them), or None."""
    named = [(k, v) for k, v in named if v.is_floating_point() or v.is_complex()]
    if not named:
        return None
    finite = torch.stack([v.detach().isfinite().all() for _, v in named]).cpu()
    return None if bool(finite.all()) else named[int((~finite).nonzero()[0])][0]


def diverged_message(name: str, value: float, step: int, last_good: Path | None) -> str:
    """A loss term went non-finite."""
    kept = f"last good checkpoint kept at {last_good}" if last_good else "no checkpoint had been written yet"
    what = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"loss term '{name}' became {what} at step {step}; {kept} (lower the learning rate or check the data)"


def diverged_weights_message(tensor: str, step: int, last_good: Path | None) -> str:
    """A trained tensor (or a saved optimizer state) went non-finite."""
    kept = f"last good checkpoint kept at {last_good}" if last_good else "no checkpoint had been written yet"
    return (f"'{tensor}' became non-finite (nan or inf) at step {step}; {kept} "
            "(lower the learning rate or clip the gradients)")
