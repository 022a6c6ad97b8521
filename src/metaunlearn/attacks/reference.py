"""Relearning measured against a reference model that never saw the concept (e.g. retrained without it).

An erased model should be no easier to teach the concept than the reference. Per model × attack (set, kind, lr),
pairing runs by seed with the reference's identical sweep:

* ``excess_budget`` — area under the forget-rate curve over steps 0…budget minus the reference's, in points;
* ``excess_all`` — the same over the whole curve;
* ``steps_to`` — the first attack step at which the curve reaches ``level`` (linear between snapshots; None: never
  within the curve), the reference's, and their ratio (> 1: slower to relearn than the reference).

Seed intervals: the excess is the mean paired difference with a 95% Student-t interval (none for one seed); steps
are the mean over seeds with their min–max range, None when any seed never reaches the level.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from pathlib import Path

from pydantic import Field

from metaunlearn.attacks.curves import RUN_FIELDS, curve_auc, run_curves
from metaunlearn.config import StrictModel

ATTACK_FIELDS = ("attack_set", "mode", "lr")
VARIANT = "reference"
"""The variant of a model attacked as a reference (a role any model folder can take)."""
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
"""Student-t 0.975 quantiles for 1…30 degrees of freedom (1.96 beyond)."""


class ReferenceModel(StrictModel):
    """A model attacked with the identical sweep as the yardstick (e.g. retrained without the concept)."""

    name: str = Field(min_length=1, description="its name in results")
    path: Path = Field(description="diffusers model folder (relative to the config file)")


def reference_name(path: str | Path) -> str:
    """A reference's default name: its folder's, or the parent's when the folder is called ``model``."""
    p = Path(path).resolve()
    return p.parent.name if p.name == "model" else p.name


def value_at(steps: Sequence[float], values: Sequence[float], step: float) -> float:
    """The curve at ``step`` (linear between snapshots, held flat past the last)."""
    pairs = sorted(zip(steps, values))
    if step <= pairs[0][0]:
        return float(pairs[0][1])
    for (s0, v0), (s1, v1) in zip(pairs, pairs[1:]):
        if step <= s1:
            return float(v0 + (v1 - v0) * (step - s0) / (s1 - s0))
    return float(pairs[-1][1])


def auc_until(steps: Sequence[float], values: Sequence[float], until: float | None) -> float:
    """:func:`curve_auc` of the curve cut at ``until`` (interpolated there); the whole curve when None."""
    if until is None or until >= max(steps):
        return curve_auc(steps, values)
    kept = [(s, v) for s, v in sorted(zip(steps, values)) if s < until]
    kept.append((until, value_at(steps, values, until)))
    return curve_auc([s for s, _ in kept], [v for _, v in kept])


def steps_to(steps: Sequence[float], values: Sequence[float], level: float) -> float | None:
    """First step at which the curve reaches ``level`` (linear between snapshots); None if it never does."""
    pairs = sorted(zip(steps, values))
    if pairs[0][1] >= level:
        return float(pairs[0][0])
    for (s0, v0), (s1, v1) in zip(pairs, pairs[1:]):
        if v1 >= level:
            return float(s0 + (s1 - s0) * (level - v0) / (v1 - v0))
    return None


def mean_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% Student-t interval (None for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return mean, t * std / math.sqrt(n)


def _steps_summary(values: Sequence[float | None]) -> dict:
    if not values or any(v is None for v in values):
        return {"mean": None, "min": None, "max": None, "reached": sum(v is not None for v in values)}
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "reached": len(values)}


def _pairs(model_runs: Mapping[object, Mapping], ref_runs: Mapping[object, Mapping]) -> list[tuple[Mapping, Mapping]]:
    """Runs paired by attack seed (the identical sweep); seeds only one side ran are left out."""
    return [(model_runs[s], ref_runs[s]) for s in sorted(set(model_runs) & set(ref_runs), key=str)]


def against_reference(rows: Iterable[Mapping], references: Sequence[str], *, budget: int | None = None,
                      metric: str = "forget_rate", level: float = 0.5) -> list[dict]:
    """One record per (model, reference, attack set, kind, lr) that both attacked: excess areas in points with
    their seed intervals, steps to ``level`` of both and their ratio, and the seeds paired (see the module doc).

    Models and references are named by result names; replicates of a grid seed keep their name, so their runs are
    paired by attack seed."""
    curves = run_curves(rows, metric)
    by_model: dict[tuple, dict[object, Mapping]] = {}
    for c in curves:
        by_model.setdefault((c["model"], *(c[k] for k in ATTACK_FIELDS)), {})[c["seed"]] = c
    out = []
    for (model, *attack), runs in sorted(by_model.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if model in references:
            continue
        for ref in references:
            ref_runs = by_model.get((ref, *attack))
            if not ref_runs:
                continue
            pairs = _pairs(runs, ref_runs)
            if not pairs:  # attacked under other seeds: not the identical sweep, nothing to compare
                continue
            out.append(_compare(model, ref, dict(zip(ATTACK_FIELDS, attack)), pairs, budget, level, metric))
    return out


def _compare(model: str, ref: str, attack: dict, pairs: list[tuple[Mapping, Mapping]], budget: int | None,
             level: float, metric: str) -> dict:
    ex_budget = [100 * (auc_until(m["steps"], m["values"], budget) - auc_until(r["steps"], r["values"], budget))
                 for m, r in pairs]
    ex_all = [100 * (auc_until(m["steps"], m["values"], None) - auc_until(r["steps"], r["values"], None))
              for m, r in pairs]
    mine = [steps_to(m["steps"], m["values"], level) for m, _ in pairs]
    theirs = [steps_to(r["steps"], r["values"], level) for _, r in pairs]
    (eb, eb_ci), (ea, ea_ci) = mean_interval(ex_budget), mean_interval(ex_all)
    s_model, s_ref = _steps_summary(mine), _steps_summary(theirs)
    ratio = s_model["mean"] / s_ref["mean"] if s_model["mean"] and s_ref["mean"] else None
    worst = max(range(len(pairs)), key=lambda i: ex_budget[i])
    return {"model": model, "reference": ref, **attack, "metric": metric, "budget": budget, "level": level,
            "seeds": [m["seed"] for m, _ in pairs], "excess_budget": eb, "excess_budget_ci": eb_ci,
            "excess_all": ea, "excess_all_ci": ea_ci, "steps_to": s_model, "reference_steps_to": s_ref,
            "steps_ratio": ratio, "last_step": pairs[0][0]["last_step"],
            "worst_run": {k: pairs[worst][0][k] for k in RUN_FIELDS}, "worst_run_excess": ex_budget[worst]}


def worst_excess(records: Iterable[Mapping], value: str = "excess_budget") -> list[dict]:
    """Per (model, reference): the attack with the largest mean ``value`` over the sweep, and its worst run."""
    best: dict[tuple[str, str], Mapping] = {}
    for r in records:
        key = (r["model"], r["reference"])
        if key not in best or r[value] > best[key][value]:
            best[key] = r
    return [dict(best[k]) for k in sorted(best)]
