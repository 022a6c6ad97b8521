"""Relearning curves: every attack run's snapshots as a curve, its area under the curve, and the worst case over a
whole sweep with the run that reached it.

The area under a curve is the trapezoidal integral of the metric over attack steps divided by the steps spanned,
i.e. the metric's mean along the attack (in [0,1] for a rate): 0 means the concept never came back, 1 that it was
back from the first step. Unlike a single snapshot it rewards a defence that delays relearning and punishes one
that is broken early and recovers. Areas are comparable between runs with the same snapshot steps; the worst case
is therefore taken per attack set (one budget) while the worst final value is also taken across sets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

RUN_FIELDS = ("model", "attack_set", "mode", "lr", "seed")
"""The fields naming one attack run (a model's curve under one set, kind, learning rate and seed)."""


def curve_auc(steps: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoidal area under ``values`` over ``steps`` divided by the span (the value itself for one point)."""
    if len(steps) != len(values) or not steps:
        raise ValueError("a curve needs as many values as steps, at least one")
    pairs = sorted(zip(steps, values))
    if len(pairs) == 1 or pairs[-1][0] == pairs[0][0]:
        return float(pairs[0][1])
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(pairs, pairs[1:]))
    return area / (pairs[-1][0] - pairs[0][0])


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None


def run_curves(rows: Iterable[Mapping], metric: str = "forget_rate") -> list[dict]:
    """One record per attack run: its fields, ``steps``, ``values``, ``auc``, ``final`` (value at the last step),
    ``last_step`` and ``reduced`` (the steps evaluated on fewer samples per prompt than the run's most, under an
    evaluation budget). Runs with a missing value at any snapshot (a diverged attack) are left out."""
    grouped: dict[tuple, list[tuple[int, float | None, float | None]]] = {}
    for row in rows:
        key = tuple(row.get(k) for k in RUN_FIELDS)
        grouped.setdefault(key, []).append((row["step"], _finite(row.get(metric)),
                                            _finite(row.get("samples_per_prompt"))))
    out = []
    for key, points in grouped.items():
        points.sort()
        if any(v is None for _, v, _ in points):
            continue
        steps, values = [s for s, _, _ in points], [v for _, v, _ in points]
        most = max((k for _, _, k in points if k is not None), default=None)
        reduced = [s for s, _, k in points if k is not None and k < most]
        out.append({**dict(zip(RUN_FIELDS, key)), "metric": metric, "steps": steps, "values": values,
                    "auc": curve_auc(steps, values), "final": values[-1], "last_step": steps[-1],
                    "reduced": reduced})
    return sorted(out, key=lambda r: tuple(str(r[k]) for k in RUN_FIELDS))


def run_label(run: Mapping) -> str:
    """``<set> <kind> lr <lr> seed <seed>``: how a report names a run."""
    return f"{run['attack_set']} {run['mode']} lr {run['lr']:g} seed {run['seed']}"


def worst_runs(curves: Iterable[Mapping], value: str = "auc", by: Sequence[str] = ("model", "attack_set")) -> list[dict]:
    """Per group of ``by``: the run with the highest ``value`` (``auc`` or ``final``) over every other run field."""
    best: dict[tuple, Mapping] = {}
    for c in curves:
        key = tuple(c[k] for k in by)
        if key not in best or c[value] > best[key][value]:
            best[key] = c
    return [{**dict(zip(by, key)), "worst": c[value], "value": value,
             "run": {k: c[k] for k in RUN_FIELDS}, "label": run_label(c)} for key, c in sorted(best.items())]
