"""The report's tables in the paper's shape: forget rate per model × attack × snapshot, the worst case, meta against
plain (and against its equal-damage control), and benign quality before and after the attacks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from metaunlearn.errors import UserError
from metaunlearn.experiment.html import Table
from metaunlearn.formatting import attack_label, format_lr, percent, seeds_phrase

if TYPE_CHECKING:
    from metaunlearn.experiment.report import ReportConfig

VARIANT_ORDER = {"base": 0, "reference": 1, "plain": 2, "control": 3, "meta": 4}
METRIC_LABELS = {
    "forget_rate": "forget rate (%)",
    "related_acc": "related-concept accuracy (%)",
    "irrelevant_acc": "irrelevant-concept accuracy (%)",
}


def attack_sets_in_order(rows: Sequence[Mapping], config: ReportConfig) -> tuple[str, list[str]]:
    """``(primary set, all sets in column order)``."""
    present = sorted({r["attack_set"] for r in rows})
    primary = config.primary_set or ("hrm-m" if "hrm-m" in present else present[0])
    if primary not in present:
        raise UserError(f"primary attack set {primary!r} has no results (found: {', '.join(present)})")
    if config.set_order:
        order = [s for s in config.set_order if s in present] + [s for s in present if s not in config.set_order]
    else:
        rest = [s for s in present if s != primary]
        order = [primary] + sorted(rest, key=lambda s: (not s.lower().startswith("hrm"), s))
    return primary, order


def model_order(rows: Sequence[Mapping]) -> list[tuple[str, str, str]]:
    """``(model, method, variant)`` in table order: base, references, then by method, plain before meta."""
    models = {(r["model"], r["method"], r["variant"]) for r in rows}
    first = {"base": 0, "reference": 1}  # the models every method is compared with come first
    return sorted(models, key=lambda m: (first.get(m[2], 2), m[1], VARIANT_ORDER.get(m[2], 9), m[0]))


def paper_table(rows: Sequence[Mapping], config: ReportConfig) -> tuple[Table, Table, dict]:
    """The main table (mean ± std over seeds) and the worst-case table, plus both as JSON-able data."""
    from metaunlearn.attacks.sweep import aggregate, worst_case

    metric = config.metric
    primary, sets = attack_sets_in_order(rows, config)
    steps_of = {s: sorted({r["step"] for r in rows if r["attack_set"] == s}) for s in sets}
    columns_spec: list[tuple[str, str, int]] = [("before FT", primary, 0)]
    columns_spec += [(f"{primary} @{k}" + (" (budget)" if k == config.budget_steps else ""), primary, k)
                     for k in steps_of[primary] if k > 0]
    columns_spec += [(f"{s} @{steps_of[s][-1]}", s, steps_of[s][-1]) for s in sets if s != primary and steps_of[s][-1] > 0]

    agg = {(a["model"], a["attack_set"], a["mode"], a["lr"], a["step"]): a
           for a in aggregate(rows, metric, by=("model", "attack_set", "mode", "lr", "step"))}
    lost: dict[tuple, int] = {}
    for r in rows:
        if r.get("diverged") is True:
            key = (r["model"], r["attack_set"], r["mode"], r["lr"], r["step"])
            lost[key] = lost.get(key, 0) + 1
    worst = {(w["model"], w["attack_set"], w["step"]): w
             for w in worst_case(rows, metric, by=("model", "attack_set", "step"))}
    models = model_order(rows)
    names_unique = len({(m[1], m[2]) for m in models}) == len(models)
    labels = ["method", "variant"] + ([] if names_unique else ["model"])
    attacks = sorted({(r["mode"], r["lr"]) for r in rows})

    main_rows, worst_rows, data = [], [], {"columns": [c[0] for c in columns_spec], "mean": [], "worst": []}
    counts: list[int] = []
    for model, method, variant in models:
        label = [method, variant] + ([] if names_unique else [model])
        for mode, lr in attacks:
            cells, values = [], []
            for _, s, k in columns_spec:
                a, d = agg.get((model, s, mode, lr, k)), lost.get((model, s, mode, lr, k), 0)
                cell = percent(a["mean"], a["std"], a["n"]) if a else ("diverged" if d else "—")
                cells.append(f"{cell} ({d} diverged)" if a and d else cell)
                values.append({"mean": a["mean"], "std": a["std"] if a["n"] > 1 else None, "n": a["n"]} if a else None)
                counts.append(a["n"] if a else 0)
            if any(c != "—" for c in cells):
                main_rows.append(label + [attack_label(mode, lr)] + cells)
                data["mean"].append({"model": model, "method": method, "variant": variant, "mode": mode,
                                     "lr": lr, "cells": values})
        cells, values = [], []
        for _, s, k in columns_spec:
            w = worst.get((model, s, k))
            cells.append(percent(w["worst"]) if w else "—")
            values.append(w)
        final = worst.get((model, primary, steps_of[primary][-1]))
        reached = "—"
        if final and final["at"]:
            at = final["at"]
            lr = at.get("lr")
            reached = f"{at.get('mode', '?')} lr {format_lr(lr) if lr is not None else '?'} seed {at.get('seed', '?')}"
        worst_rows.append(label + cells + [reached])
        data["worst"].append({"model": model, "method": method, "variant": variant, "cells": values})

    what = METRIC_LABELS.get(metric, metric)
    main = Table(
        title=f"{what}: {seeds_phrase(c for c in counts if c)}",
        columns=labels + ["attack"] + [c[0] for c in columns_spec],
        rows=main_rows,
        note=(f"Columns: before finetuning (step 0), attack set {primary} after each snapshot step, other attack "
              "sets after their last step. Lower is better for the defender."),
        label_columns=len(labels) + 1,
    )
    worst_table = Table(
        title=f"{what}: worst case over every mode × learning rate" + (" × seed" if max(counts, default=1) > 1 else ""),
        columns=labels + [c[0] for c in columns_spec] + [f"worst {primary} run"],
        rows=worst_rows,
        note="Each cell is the maximum over the whole attack sweep at that step"
             + (" (diverged runs left out)." if lost else "."),
        label_columns=len(labels),
    )
    return main, worst_table, data


def reduction_table(rows: Sequence[Mapping], config: ReportConfig, against: str = "plain") -> Table | None:
    """Meta against plain (or ``against`` = control) per method: ``1 − meta / plain`` of the mean metric under each
    attack of the primary set at each snapshot step, and of the worst case over the sweep (``None`` without a
    method that has both)."""
    from metaunlearn.attacks.sweep import aggregate, worst_case

    metric = config.metric
    primary, _ = attack_sets_in_order(rows, config)
    ours = [r for r in rows if r["attack_set"] == primary and isinstance(r.get(metric), (int, float))]
    steps = sorted({r["step"] for r in ours if r["step"] > 0})
    models = {(m[1], m[2]): m[0] for m in model_order(ours)}
    methods = sorted({method for method, variant in models if variant == "meta" and (method, against) in models})
    if not methods or not steps:
        return None
    mean = {(a["model"], a["mode"], a["lr"], a["step"]): a["mean"]
            for a in aggregate(ours, metric, by=("model", "mode", "lr", "step"))}
    worst = {(w["model"], w["step"]): w["worst"] for w in worst_case(ours, metric, by=("model", "step"))}

    def cell(plain: float | None, meta: float | None) -> str:
        if plain is None or meta is None or not (math.isfinite(plain) and math.isfinite(meta)) or plain <= 0:
            return "—"
        return f"{100 * (1 - meta / plain):.0f}%"

    attacks = sorted({(r["mode"], r["lr"]) for r in ours})
    out = []
    for method in methods:
        plain, meta = models[(method, against)], models[(method, "meta")]
        for mode, lr in attacks:
            out.append([method, attack_label(mode, lr)]
                       + [cell(mean.get((plain, mode, lr, k)), mean.get((meta, mode, lr, k))) for k in steps])
        out.append([method, "worst case"] + [cell(worst.get((plain, k)), worst.get((meta, k))) for k in steps])
    what = METRIC_LABELS.get(metric, metric)
    return Table(
        title=f"meta vs {against}: relative reduction of the {what.split(' (')[0]} on {primary}",
        columns=["method", "attack"] + [f"{primary} @{k}" + (" (budget)" if k == config.budget_steps else "")
                                        for k in steps],
        rows=out,
        note=(f"1 − meta / {against} of the mean over seeds (worst case: of the maximum over every mode × lr × seed); "
              f"higher is better for the defender; — where {against} is 0."
              + (" The control is the plain method pushed until its benign accuracy before any attack matches the "
                 "meta model's: meta counts as a defence only where it beats it." if against == "control" else "")),
        label_columns=2,
    )


def quality_table(rows: Sequence[Mapping], primary: str) -> Table | None:
    """Benign quality and the attack loss before and after the primary attack (mean over everything else)."""
    per_set = sorted({k for r in rows for k in r if k.startswith("clip_score/")})
    wanted = [m for m in ("related_acc", "irrelevant_acc", "fid", "clip_score", *per_set, "attack_loss")
              if any(isinstance(r.get(m), (int, float)) for r in rows)]
    if not wanted:
        return None
    last = max(r["step"] for r in rows if r["attack_set"] == primary)
    out_rows = []
    for model, method, variant in model_order(rows):
        for m in wanted:
            cells = [method, variant, model, m]
            for step in (0, last):
                vals = [float(r[m]) for r in rows if r["model"] == model and r["attack_set"] == primary
                        and r["step"] == step and isinstance(r.get(m), (int, float)) and math.isfinite(r[m])]
                if not vals:
                    cells.append("—")
                elif m in METRIC_LABELS:
                    cells.append(f"{100 * sum(vals) / len(vals):.1f}")
                else:
                    cells.append(f"{sum(vals) / len(vals):.4g}")
            out_rows.append(cells)
    return Table(
        title=f"Benign quality and attack loss on {primary} (mean over modes, lrs, seeds)",
        columns=["method", "variant", "model", "metric", "before attack", f"after {last} steps"], rows=out_rows,
        note="Accuracies in %; fid = Fréchet distance in the configured feature space (not Inception); "
             "clip_score = 100 × cosine; attack_loss = denoising loss on a fixed probe of the attack data.",
        label_columns=4,
    )
