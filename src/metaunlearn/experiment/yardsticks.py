"""The report's yardsticks: a model that never saw the concept, the attacker's payoff, the equal-damage control."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from metaunlearn.attacks.payoff import PayoffConfig, payoff_summary
from metaunlearn.attacks.reference import against_reference, worst_excess
from metaunlearn.experiment.html import Table
from metaunlearn.formatting import attack_label


def reference_models(rows: Sequence[Mapping]) -> list[str]:
    """Result names of the models attacked as references (variant ``reference``)."""
    return sorted({r["model"] for r in rows if r.get("variant") == "reference"})


def _run(run: Mapping | None) -> str:
    """``hrm-m full lr 1e-4 seed 0`` (``@ step`` when the record names one)."""
    if run is None:
        return "no usable snapshot"
    at = f" @{run['step']}" if "step" in run else ""
    return f"{run['attack_set']} {attack_label(run['mode'], run['lr'])} seed {run['seed']}{at}"


def _points(mean: float | None, ci: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:+.1f}" if ci is None else f"{mean:+.1f} ± {ci:.1f}"


def _steps(summary: Mapping, last: int) -> str:
    if summary["mean"] is None:
        return f"> {last}" if summary["reached"] == 0 else f"> {last} in some seeds"
    if summary["min"] == summary["max"]:
        return f"{summary['mean']:.0f}"
    return f"{summary['mean']:.0f} [{summary['min']:.0f}–{summary['max']:.0f}]"


def reference_table(rows: Sequence[Mapping], metric: str, budget: int | None,
                    models: Sequence[tuple[str, str, str]]) -> tuple[Table | None, Table | None, list[dict]]:
    """Per model × attack: excess relearning over the reference and steps to 50%; then each model's worst excess."""
    refs = reference_models(rows)
    records = against_reference(rows, refs, budget=budget, metric=metric) if refs else []
    if not records:
        return None, None, []
    order = {m[0]: i for i, m in enumerate(models)}
    records.sort(key=lambda r: (order.get(r["model"], len(order)), r["reference"], r["attack_set"], r["mode"], r["lr"]))
    labels = {m[0]: m for m in models}
    within = f"0–{budget}" if budget else "whole curve"
    out = []
    for r in records:
        _, method, variant = labels.get(r["model"], (r["model"], "?", "?"))
        out.append([method, variant, r["model"], r["reference"], r["attack_set"], attack_label(r["mode"], r["lr"]),
                    _points(r["excess_budget"], r["excess_budget_ci"]), _points(r["excess_all"], r["excess_all_ci"]),
                    _steps(r["steps_to"], r["last_step"]), _steps(r["reference_steps_to"], r["last_step"]),
                    "—" if r["steps_ratio"] is None else f"{r['steps_ratio']:.2f}", str(len(r["seeds"]))])
    table = Table(
        title="Against a model that never saw the concept",
        columns=["method", "variant", "model", "reference", "attack set", "attack", f"excess AUC {within} (points)",
                 "excess AUC, whole curve (points)", "steps to 50%", "reference's steps to 50%", "ratio", "seeds"],
        rows=out,
        note=f"Excess = area under the {metric} curve minus the reference's under the identical attack (same sets, "
             "kinds, lrs, seeds, evaluation), in percentage points of the mean rate; ≤ 0 means no easier to relearn "
             "than a model that never learned the concept. ± is a 95% t-interval over paired seeds; steps to 50% are "
             "interpolated between snapshots (mean [min–max] over seeds); ratio > 1 relearns slower.",
        label_columns=6,
    )
    worst = worst_excess(records)
    worst_rows = [[labels.get(w["model"], (w["model"], "?", "?"))[1], labels.get(w["model"], ("", "?", "?"))[2],
                   w["model"], w["reference"], f"{w['attack_set']} {attack_label(w['mode'], w['lr'])}",
                   _points(w["excess_budget"], w["excess_budget_ci"]), _run(w["worst_run"]), f"{w['worst_run_excess']:+.1f}"]
                  for w in worst]
    worst_table = Table(
        title="Worst excess relearning over the sweep",
        columns=["method", "variant", "model", "reference", "attack", f"excess AUC {within} (points)", "worst run",
                 "its excess (points)"],
        rows=worst_rows, label_columns=5,
        note="The attack with the largest mean excess over the first budget steps, and its worst single run.")
    return table, worst_table, records


def payoff_table(rows: Sequence[Mapping], cfg: PayoffConfig,
                 models: Sequence[tuple[str, str, str]]) -> tuple[Table | None, list[dict]]:
    """Per model: the share of attacks that got the concept back in a usable model, and the worst usable rate."""
    summary = payoff_summary(rows, cfg)
    if not summary:
        return None, []
    by_model = {s["model"]: s for s in summary}
    out = []
    for model, method, variant in models:
        s = by_model.get(model)
        if s is None:
            continue
        worst = "—" if s["worst_usable"] is None else f"{100 * s['worst_usable']:.1f}"
        out.append([method, variant, model, f"{s['successes']}/{s['runs']}", f"{100 * s['share']:.0f}", worst,
                    _run(s["worst_usable_run"])])
    table = Table(
        title="The attacker's payoff: the concept back in a usable model",
        columns=["method", "variant", "model", "successful attacks", "share (%)", "worst forget rate, usable (%)",
                 "reached by"],
        rows=out, label_columns=3,
        note=f"An attack succeeds when at some snapshot the {cfg.forget_metric} is ≥ {100 * cfg.forget_rate:g}% while "
             f"the model is usable: {cfg.related_metric} ≥ {cfg.related_ratio:g}× and {cfg.fd_metric} ≤ "
             f"{cfg.fd_ratio:g}× the released model's (its step 0; the FD test applies where both snapshots have "
             "one). A defence whose relearned models are all broken wins even at a 100% forget rate.")
    return table, summary


def control_table(rows: Sequence[Mapping], config, models: Sequence[tuple[str, str, str]]) -> Table | None:
    """Per method with a control: benign quality before any attack of plain, control and meta (the damage matched)."""
    from metaunlearn.attacks.sweep import aggregate

    methods = sorted({m[1] for m in models if m[2] == "control"})
    if not methods:
        return None
    metrics = [m for m in (config.payoff.related_metric, "irrelevant_acc", config.payoff.fd_metric)
               if any(isinstance(r.get(m), (int, float)) for r in rows)]
    before = {(a["model"], metric): a["mean"] for metric in metrics
              for a in aggregate([r for r in rows if r["step"] == 0], metric, by=("model",))}
    out = []
    for method in methods:
        for model, _, variant in [m for m in models if m[1] == method and m[2] in ("plain", "control", "meta")]:
            cells = [before.get((model, m)) for m in metrics]
            out.append([method, variant, model, *[_quality(m, v) for m, v in zip(metrics, cells)]])
    return Table(title="The equal-damage control: benign quality before any attack",
                 columns=["method", "variant", "model", *metrics], rows=out, label_columns=3,
                 note="The control is the plain method pushed harder until its benign quality before any attack "
                      "matches the meta model's; meta counts as a defence only where it beats the control. Mean over "
                      "every attack run's step 0.")


def _quality(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if metric == "fid" else f"{100 * value:.1f}"


def yardstick_tables(rows: Sequence[Mapping], config, models: Sequence[tuple[str, str, str]]) -> dict:
    """The report's tables of this module (``tables``) and their data (``against_reference``, ``payoff``)."""
    excess, worst, records = reference_table(rows, config.metric, config.budget_steps, models)
    payoff, summary = payoff_table(rows, config.payoff, models)
    control = control_table(rows, config, models)
    return {"tables": [t for t in (excess, worst, payoff, control) if t is not None], "against_reference": records,
            "payoff": summary}
