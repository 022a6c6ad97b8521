"""Report tables of relearning curves: the area under each attack's curve, and the worst case over a whole sweep
with the run that reached it and the benign quality at that snapshot (so resisting is never confused with collapse).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from metaunlearn.attacks.curves import run_curves, worst_runs
from metaunlearn.experiment.html import Table
from metaunlearn.formatting import attack_label, canonical_variant, seeds_phrase

QUALITY_METRICS = ("related_acc", "irrelevant_acc", "none_rate", "fid")


def _label(run: Mapping) -> str:
    """``hrm-m full lr 1e-4 seed 0``."""
    return f"{run['attack_set']} {attack_label(run['mode'], run['lr'])} seed {run['seed']}"


def _mean_std(values: Sequence[float]) -> str:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return f"{100 * mean:.1f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _models(curves: Sequence[Mapping], order: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    present = {c["model"] for c in curves}
    return [m for m in order if m[0] in present]


def auc_table(rows: Sequence[Mapping], metric: str, sets: Sequence[str],
              models: Sequence[tuple[str, str, str]]) -> Table | None:
    """Per model × attack set × kind × lr: area under the curve and the last snapshot, mean ± std over seeds."""
    curves = run_curves(rows, metric)
    if not curves:
        return None
    groups: dict[tuple, list[Mapping]] = {}
    for c in curves:
        groups.setdefault((c["model"], c["attack_set"], c["mode"], c["lr"]), []).append(c)
    out, counts = [], []
    for model, method, variant in _models(curves, models):
        for s in sets:
            for key in sorted(k for k in groups if k[0] == model and k[1] == s):
                runs = groups[key]
                steps = runs[0]["steps"]
                counts.append(len(runs))
                reduced = sorted({step for r in runs for step in r.get("reduced", [])})
                fewer = f"; {', '.join(map(str, reduced))} on fewer samples" if reduced else ""
                out.append([method, variant, model, s, attack_label(key[2], key[3]),
                            f"0–{steps[-1]} ({len(steps)}{fewer})", _mean_std([r["auc"] for r in runs]),
                            _mean_std([r["final"] for r in runs]), str(len(runs))])
    return Table(
        title=f"Relearning curves: area under the {metric} curve",
        columns=["method", "variant", "model", "attack set", "attack", "steps (snapshots)", "AUC (%)",
                 "at last step (%)", "seeds"],
        rows=out,
        note="AUC = trapezoidal area under the curve over attack steps ÷ steps spanned (the mean rate along the "
             f"attack; 0 = never relearned, 100 = relearned from the first step); {seeds_phrase(counts)}."
             + (" Steps 'on fewer samples' were evaluated under an evaluation budget (attack.snapshot_samples); "
                "every row of results.csv gives its samples per prompt and the 95% Wilson interval of each rate."
                if any(c.get("reduced") for c in curves) else ""),
        label_columns=5,
    )


def _quality_at(rows: Sequence[Mapping], run: Mapping, step: int) -> list[str]:
    match = [r for r in rows if all(r.get(k) == v for k, v in run.items()) and r["step"] == step]
    cells = []
    for m in QUALITY_METRICS:
        v = match[0].get(m) if match else None
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            cells.append("—")
        else:
            cells.append(f"{v:.3g}" if m == "fid" else f"{100 * v:.1f}")
    return cells


def worst_table(rows: Sequence[Mapping], metric: str, primary: str,
                models: Sequence[tuple[str, str, str]]) -> tuple[Table | None, list[dict]]:
    """Per model: the worst area under the curve on the primary set and the worst value at any run's last step
    over every set, kind, lr and seed, each with the run that reached it and benign quality there."""
    curves = run_curves(rows, metric)
    if not curves:
        return None, []
    auc = {w["model"]: w for w in worst_runs([c for c in curves if c["attack_set"] == primary], "auc", ("model",))}
    final = {w["model"]: w for w in worst_runs(curves, "final", ("model",))}
    last_step = {tuple(c[k] for k in ("model", "attack_set", "mode", "lr", "seed")): c["last_step"] for c in curves}
    out, data = [], []
    for model, method, variant in _models(curves, models):
        a, f = auc.get(model), final.get(model)
        cells = [method, variant, model]
        cells += [f"{100 * a['worst']:.1f}", _label(a["run"])] if a else ["—", "—"]
        if f:
            step = last_step[tuple(f["run"][k] for k in ("model", "attack_set", "mode", "lr", "seed"))]
            cells += [f"{100 * f['worst']:.1f}", f"{_label(f['run'])} @{step}"] + _quality_at(rows, f["run"], step)
        else:
            cells += ["—", "—"] + ["—"] * len(QUALITY_METRICS)
        out.append(cells)
        data.append({"model": model, "worst_auc": a, "worst_final": f})
    table = Table(
        title=f"Worst case over every attack, learning rate and seed ({metric})",
        columns=["method", "variant", "model", f"worst AUC on {primary} (%)", "reached by",
                 "worst at last step (%)", "reached by", "related acc there (%)", "irrelevant acc there (%)",
                 "benign 'none' there (%)", "FD there"],
        rows=out,
        note="The worst AUC is taken over the primary set's runs (one budget); the worst last-step value over every "
             "attack set, kind, lr and seed. Benign quality at that snapshot shows whether a low value is resistance "
             "or collapse (benign 'none' = benign samples in which the detector sees nothing; FD = Fréchet distance "
             "of benign samples to reference images).",
        label_columns=3,
    )
    return table, data




def prompt_attack_table(prompt_rows: Sequence[Mapping], rows: Sequence[Mapping], metric: str,
                        models: Sequence[tuple[str, str, str]]) -> Table | None:
    """Prompt attacks beside finetuning: per model, the unattacked forget prompts (step 0), each prompt attack's
    forget rate and attack success rate (mean over seeds), the worst finetuning run's last step, and the worst of
    all attacks with its name."""
    if not prompt_rows:
        return None
    prompt_rows = [{**r, "variant": canonical_variant(r["variant"])} for r in prompt_rows]
    names = sorted({r["attack"] for r in prompt_rows})
    curves = run_curves(rows, metric)
    worst_ft = {w["model"]: w for w in worst_runs(curves, "final", ("model",))}
    present = {r["model"] for r in prompt_rows}
    known = [m for m in models if m[0] in present]
    known += sorted({(r["model"], r["method"], r["variant"]) for r in prompt_rows} - set(known))

    def mean(values: list[float]) -> float | None:
        values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        return sum(values) / len(values) if values else None

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.0f}"

    out = []
    for model, method, variant in known:
        step0 = [r for r in rows if r["model"] == model and r["step"] == 0]
        cells = [method, variant, model, f"{pct(mean([r.get(metric) for r in step0]))} / "
                                         f"{pct(mean([r.get('asr') for r in step0]))}"]
        candidates = []
        for name in names:
            mine = [r for r in prompt_rows if r["model"] == model and r["attack"] == name]
            f, a = mean([r.get(metric) for r in mine]), mean([r.get("asr") for r in mine])
            cells.append(f"{pct(f)} / {pct(a)}")
            if f is not None:
                candidates.append((f, f"prompt: {name}"))
        w = worst_ft.get(model)
        cells.append(f"{pct(w['worst'])} ({_label(w['run'])})" if w else "—")
        if w:
            candidates.append((w["worst"], f"finetuning: {_label(w['run'])}"))
        best = max(candidates, default=None)
        cells.append(f"{pct(best[0])} ({best[1]})" if best else "—")
        out.append(cells)
    return Table(
        title="Prompt attacks (no weight change) beside finetuning attacks",
        columns=["method", "variant", "model", "unattacked forget / ASR (%)",
                 *[f"{n} forget / ASR (%)" for n in names], "worst finetuning, last step (%)", "worst of all (%)"],
        rows=out,
        note="Forget rate per sample and attack success rate (ASR: forget prompts with the concept in at least one "
             "of their samples), averaged over seeds, on the forget prompt sets only. Finetuning: the highest forget "
             "rate at any run's last step over every set, kind, lr and seed.",
        label_columns=3,
    )
