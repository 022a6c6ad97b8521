"""How well the durability signals logged during unlearning predict the measured relearning.

Reads ``RUN_DIR/models/<key>/signals.json`` (written by the unlearn stage; ``<key>`` is a model name, with ``.s<k>``
for grid seed k) and pairs each model's final signals (mean over its grid seeds) with its measured forget rate under
the primary attack set at the budget step: the worst case over every attack run and seed, and the mean. The table
gives one row per model and, per signal, Spearman's ρ over models (torchmetrics) against both.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from metaunlearn.experiment.html import Table

SIGNALS = {
    "sig_forget_grad_norm": "‖∇L_f‖",
    "sig_forget_related_cos": "cos(∇L_f, ∇L_r)",
    "sig_forget_top_eig": "λ_max(∇²L_f)",
    "sig_distance": "‖θ − θ_base‖",
}


def read_signals(run_dir: Path) -> dict[str, list[dict]]:
    """``{model name: [signals of each grid seed]}`` from every ``models/*/signals.json``."""
    out: dict[str, list[dict]] = {}
    for path in sorted(Path(run_dir).glob("models/*/signals.json")):
        name = re.sub(r"\.s\d+$", "", path.parent.name)
        try:
            out.setdefault(name, []).append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            continue
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (``None`` for fewer than 3 pairs or a constant side)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    import torch
    from torchmetrics.functional import spearman_corrcoef

    return float(spearman_corrcoef(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)))


def signals_table(run_dir: Path, rows: Sequence[Mapping], metric: str, primary: str, budget: int | None) -> Table | None:
    """The table described in the module docstring (``None`` when no model has signals)."""
    signals = read_signals(run_dir)
    ours = [r for r in rows if r["attack_set"] == primary and isinstance(r.get(metric), (int, float))
            and math.isfinite(r[metric])]
    steps = sorted({r["step"] for r in ours if r["step"] > 0})
    if not signals or not steps:
        return None
    step = budget if budget in steps else steps[0]
    measured: dict[str, list[float]] = {}
    for r in ours:
        if r["step"] == step:
            measured.setdefault(r["model"], []).append(float(r[metric]))
    models = [m for m in sorted(signals) if m in measured]
    if not models:
        return None
    present = [s for s in SIGNALS if any(s in d for m in models for d in signals[m])]
    means = {m: {s: _mean([d[s] for d in signals[m] if isinstance(d.get(s), (int, float))]) for s in present}
             for m in models}
    worst = {m: max(measured[m]) for m in models}
    mean = {m: sum(measured[m]) / len(measured[m]) for m in models}
    out_rows = []
    for m in models:
        out_rows.append([m] + [_fmt(means[m][s]) for s in present]
                        + [f"{100 * worst[m]:.0f}", f"{100 * mean[m]:.0f}"])
    for label, target in (("Spearman ρ vs worst", worst), ("Spearman ρ vs mean", mean)):
        cells = []
        for s in present:
            pairs = [(means[m][s], target[m]) for m in models if means[m][s] is not None]
            rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
            cells.append("—" if rho is None else f"{rho:+.2f}")
        out_rows.append([label] + cells + ["", ""])
    return Table(
        title=f"Durability signals at the end of unlearning vs the measured {metric} on {primary} @{step}",
        columns=["model"] + [SIGNALS[s] for s in present] + [f"worst @{step} (%)", f"mean @{step} (%)"],
        rows=out_rows,
        note=(f"Signals: mean over grid seeds of each model's final values (signals.json); L_f / L_r = denoising "
              f"loss on fixed forget / related batches. Measured: the {metric} after {step} attack steps on "
              f"{primary}, worst case and mean over every run and seed. ρ over {len(models)} models; a signal "
              "that predicts durability has ρ far from 0 (few models: read it as a hint, not a test)."),
        label_columns=1,
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"
