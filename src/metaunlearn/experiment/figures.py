"""The report's figures from result rows: relearning curves as small multiples, one column per method.

Every figure has one column per method (or per model pair when a method appears with several settings) and one row
per attack (attack set × mode × learning rate); in each panel the plain and the meta model are drawn in the same
two colours everywhere, the base model (if attacked) in grey and every reference model in green, seeds as a band of ± one std, and the attack budget
(``report.budget_steps``) as a dotted vertical line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from metaunlearn.experiment.plots import Curve, save_figure, small_multiples
from metaunlearn.formatting import attack_label, seeds_phrase

Panels = dict[tuple[str, str], list[Curve]]


def column_of(rows: Sequence[Mapping]) -> dict[str, str]:
    """``{model: panel column}``: the method, or the model name without its variant suffix when a method has more
    than one plain (or meta) model; the base and reference models go into every column (key ``""``)."""
    models = {(r["model"], r["method"], r["variant"]) for r in rows}
    per_method: dict[tuple[str, str], int] = {}
    for _, method, variant in models:
        per_method[(method, variant)] = per_method.get((method, variant), 0) + 1
    out = {}
    for model, method, variant in models:
        if variant in ("base", "reference"):
            out[model] = ""
        elif per_method[(method, variant)] > 1:
            out[model] = re.sub(r"[-_.](plain|meta|unlearn)$", "", model)
        else:
            out[model] = method
    return out


def panels_of(rows: Sequence[Mapping], metric: str, attacks: Sequence[tuple[str, str, float]],
              dashed: bool = False) -> tuple[Panels, list[int]]:
    """Curves of ``metric`` per (attack row, column) for the given ``(attack set, mode, lr)`` rows, and the seed
    count of every point."""
    from metaunlearn.attacks.sweep import aggregate

    columns = column_of(rows)
    named = sorted({c for c in columns.values() if c}) or [""]
    agg = aggregate(rows, metric, by=("model", "variant", "attack_set", "mode", "lr", "step"))
    several_sets = len({a[0] for a in attacks}) > 1
    panels: Panels = {}
    counts: list[int] = []
    for attack_set, mode, lr in attacks:
        row = f"{attack_set} · {attack_label(mode, lr)}" if several_sets else attack_label(mode, lr)
        lines: dict[str, list[dict]] = {}
        for a in agg:
            if (a["attack_set"], a["mode"], a["lr"]) == (attack_set, mode, lr):
                lines.setdefault(a["model"], []).append(a)
        for model, points in sorted(lines.items()):
            points.sort(key=lambda p: p["step"])
            variant = points[0]["variant"]
            curve = Curve(variant, [p["step"] for p in points], [p["mean"] for p in points],
                          [p["std"] for p in points], [p["n"] for p in points], dashed=dashed, label=model)
            counts += curve.n
            for column in ([columns[model]] if columns[model] else named):
                panels.setdefault((row, column or "base model"), []).append(curve)
    return panels, counts


def _merge(a: Panels, b: Panels) -> Panels:
    out = {k: list(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, []).extend(v)
    return out


def _band_note(counts: Sequence[int]) -> str:
    phrase = seeds_phrase(counts)
    if phrase == "one seed":
        return "one seed per point (no band)"
    return f"{phrase}; bands ± 1 std"


def report_figures(rows: Sequence[Mapping], metric: str, metric_label: str, related_metric: str | None,
                   primary: str, sets: Sequence[str], budget: int | None, assets: Path) -> list[tuple[Path, str]]:
    """Write the report's figures into ``assets``; returns ``(png, caption)`` pairs."""
    attacks = sorted({(r["attack_set"], r["mode"], r["lr"]) for r in rows}, key=lambda a: (sets.index(a[0]), a[1:]))
    primary_attacks = [a for a in attacks if a[0] == primary]
    other_attacks = [a for a in attacks if a[0] != primary]
    budget_note = f"; dotted line: the attack budget ({budget} steps)" if budget is not None else ""
    out = []

    panels, counts = panels_of(rows, metric, primary_attacks)
    if panels:
        fig = small_multiples(panels, f"Relearning under attack on {primary}: {metric_label}", metric_label,
                              budget=budget)
        out.append((save_figure(fig, assets / "relearning_curves.png"),
                    f"{metric_label} against attack steps on {primary}, one column per method, one row per attack "
                    f"(mode, learning rate); {_band_note(counts)}{budget_note}. Lower is better for the defender."))
    if other_attacks:
        panels, counts = panels_of(rows, metric, other_attacks)
        if panels:
            fig = small_multiples(panels, f"The other attack sets: {metric_label}", metric_label, budget=budget)
            out.append((save_figure(fig, assets / "relearning_other_sets.png"),
                        f"{metric_label} against attack steps on {', '.join(s for s in sets if s != primary)}; "
                        f"{_band_note(counts)}{budget_note}."))
    if related_metric and any(isinstance(r.get(related_metric), (int, float)) for r in rows):
        related, counts = panels_of(rows, related_metric, primary_attacks)
        styles = None
        if any(isinstance(r.get("irrelevant_acc"), (int, float)) for r in rows):
            irrelevant, more = panels_of(rows, "irrelevant_acc", primary_attacks, dashed=True)
            related, counts = _merge(related, irrelevant), counts + more
            styles = {"solid": "related concepts (solid)", "dashed": "irrelevant concepts (dashed)"}
        if related:
            fig = small_multiples(related, f"Benign concepts during the attack on {primary} (self-destruct)",
                                  "accuracy (%)", budget=budget, line_styles=styles)
            out.append((save_figure(fig, assets / "self_destruct.png"),
                        f"benign accuracy against attack steps on {primary}: {related_metric} solid"
                        + (", irrelevant_acc dashed" if styles else "")
                        + f"; {_band_note(counts)}{budget_note}. A related accuracy that falls under the attack "
                        "while the irrelevant one holds is the self-destruct the meta objective aims for."))
    return out
