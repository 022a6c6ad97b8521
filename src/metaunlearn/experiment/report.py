"""The results report of a run dir: tables, relearning curves, self-destruct curves and sample grids.

Reads the layout the attack stage writes (:mod:`metaunlearn.attacks.sweep`)::

    RUN_DIR/
      attacks/<model>/<attack_set>/<mode>_lr<lr>_s<seed>.jsonl     one JSON row per snapshot step:
          {model, method, variant, attack_set, mode, lr, seed, step, grid, forget_rate, related_acc, …}
      grids/<model>/<attack_set>/<mode>_lr<lr>_s<seed>/step<k>.png  sample grid at snapshot k (path in ``grid``)

and writes (into RUN_DIR unless another folder is given)::

    results.json         {"rows": [...], "summary": [...], "worst_case": [...], "table": {...}}
    results.csv          every row (one per model × attack set × mode × lr × seed × snapshot step)
    summary.csv          mean / std (ddof=1, over seeds) / min / max / n per metric and snapshot step
    report.md            Markdown; figures linked from report_assets/
    report.html          self-contained (CSS inline, every image embedded as base64 PNG)
    report_assets/*.png  relearning curves (small multiples, :mod:`metaunlearn.experiment.figures`), self-destruct

The main table has the paper's shape: one row per method × variant (base / plain / meta) × attack (mode, lr);
columns "before FT" (step 0), the primary attack set (HRM-m) at every snapshot step (the attack budget,
``report.budget_steps``, marked), and every other set (HRM-s, CLEAN) at its last step; cells are the forget rate in
% as mean ± std over seeds where more than one seed ran, the value alone otherwise (likewise ``std`` is empty in
``summary.csv`` and null in ``results.json`` for one seed). A second table gives the worst case: the maximum over
every mode × lr × seed. Result rows written by earlier versions with the variant ``unlearn`` read as ``plain``.
Results evaluated under different evaluation settings (``eval_setting`` in their rows: the detector, prompts,
sampler, samples; :func:`metaunlearn.attacks.step_zero.evaluation_setting`) are refused with one line naming them:
no table compares them, meta vs plain included (rows of earlier versions carry no setting and are not checked).
A diverged attack run (``diverged_step`` in its rows, :mod:`metaunlearn.attacks.sweep`) has no numbers from that
step on: it is left out of every mean, std and worst case, its cells say ``diverged``, and a line names it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from metaunlearn.atomic import AtomicFiles
from metaunlearn.attacks.payoff import PayoffConfig
from metaunlearn.config import StrictModel
from metaunlearn.errors import UserError
from metaunlearn.experiment.html import Section, render_html, render_markdown
from metaunlearn.experiment.paper_tables import (
    METRIC_LABELS,
    model_order,
    attack_sets_in_order,
    paper_table,
    quality_table,
    reduction_table,
)
from metaunlearn.experiment.signals_table import signals_table
from metaunlearn.formatting import attack_label, canonical_variant

ASSETS = "report_assets"
SETTING_FIELDS = ("lr_multiple", "grid", "eval_setting", "diverged", "diverged_step")
"""Row fields that describe the run rather than measure it (never aggregated as metrics)."""


class ReportConfig(StrictModel):
    """Section ``report``: what the tables and figures show."""

    title: str = "Relearning attacks on unlearned models"
    metric: str = Field("forget_rate", description="the row metric of the main tables (a rate in [0,1])")
    related_metric: str = Field("related_acc", description="plotted against attack steps (self-destruct)")
    primary_set: str | None = Field(None, description="attack set shown at every step (default: hrm-m if present)")
    set_order: list[str] | None = Field(None, description="column order of attack sets")
    budget_steps: int | None = Field(
        None, ge=1,
        description="attack steps the defence should hold out: marked in tables and figures, signals judged there",
    )
    payoff: PayoffConfig = Field(default_factory=PayoffConfig, description="when an attack counts as a success")


@dataclass
class ReportFiles:
    """Paths written by :func:`build_report`."""

    results_json: Path
    results_csv: Path
    summary_csv: Path
    markdown: Path
    html: Path
    figures: list[Path]
    page: Path | None = None  # the results page written for the docs (``page=``)


# ---- small helpers ----------------------------------------------------------------------------------------------
def _csv_text(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()})
    return buf.getvalue()


def numeric_metrics(rows: Sequence[Mapping]) -> list[str]:
    """Metric names present in the rows (every numeric field that is not a key or a setting)."""
    from metaunlearn.attacks.sweep import KEY_FIELDS

    names: dict[str, None] = {}
    for row in rows:
        for k, v in row.items():
            if (k not in KEY_FIELDS and k not in SETTING_FIELDS and isinstance(v, (int, float))
                    and not isinstance(v, bool)):
                names.setdefault(k, None)
    return list(names)


def check_one_setting(rows: Sequence[Mapping], run_dir: Path) -> None:
    """A one-line :class:`UserError` when the rows were evaluated under more than one evaluation setting."""
    groups: dict[str, set[str]] = {}
    for r in rows:
        if isinstance(r.get("eval_setting"), str):
            groups.setdefault(r["eval_setting"], set()).add(f"{r['model']} on {r['attack_set']}")
    if len(groups) < 2:
        return
    named = "; ".join(f"{key}: {', '.join(sorted(models)[:4])}{', …' if len(models) > 4 else ''}"
                      for key, models in sorted(groups.items()))
    raise UserError(f"{run_dir}: the attack results were evaluated under {len(groups)} different evaluation settings "
                    f"(detector, prompts, sampler or samples) and cannot be compared in one report ({named}); attack "
                    "them again under one 'eval' section, or report each setting from its own run folder")


def diverged_runs(rows: Sequence[Mapping]) -> list[str]:
    """Every diverged attack run as ``<model> <set> <attack> seed <seed> at step <k>``."""
    runs = {(r["model"], r["attack_set"], r["mode"], r["lr"], r["seed"]): r["diverged_step"]
            for r in rows if isinstance(r.get("diverged_step"), int)}
    return [f"{model} {s} {attack_label(mode, lr)} seed {seed} at step {k}"
            for (model, s, mode, lr, seed), k in sorted(runs.items(), key=lambda item: str(item[0]))]


def diverged_text(rows: Sequence[Mapping]) -> str:
    """The line naming the diverged runs ('' when none diverged)."""
    runs = diverged_runs(rows)
    if not runs:
        return ""
    many = len(runs) > 1
    return (f"{len(runs)} attack run{'s' if many else ''} diverged (a non-finite loss, weights or samples) and "
            f"{'have' if many else 'has'} no numbers from that step on, left out of every mean, std and worst case: "
            + "; ".join(runs) + ".")


def grid_rows(rows: Sequence[Mapping], run_dir: Path, primary: str) -> tuple[list[str], list]:
    """Per model: the sample grid before the attack and after the last step (first mode / lr / seed with grids)."""
    out = []
    last = max(r["step"] for r in rows if r["attack_set"] == primary)
    for model, method, variant in model_order(rows):
        mine = [r for r in rows if r["model"] == model and r["attack_set"] == primary and r.get("grid")]
        if not mine:
            continue
        run = min((r["mode"], r["lr"], r["seed"]) for r in mine)
        by_step = {r["step"]: r for r in mine if (r["mode"], r["lr"], r["seed"]) == run}
        cells = []
        for step in (0, last):
            r = by_step.get(step)
            path = run_dir / r["grid"] if r else None
            caption = f"step {step} ({attack_label(run[0], run[1])}, seed {run[2]})"
            cells.append((path if path and path.is_file() else None, caption))
        out.append((f"{model} [{method}, {variant}]", cells))
    return ["model", "before attack", f"after {last} steps"], out


# ---- the report -------------------------------------------------------------------------------------------------
def build_report(run_dir: str | Path, out_dir: str | Path | None = None, config: ReportConfig | None = None,
                 page: str | Path | None = None) -> ReportFiles:
    """Read every result row of ``run_dir`` and write the results files and the Markdown + HTML report; ``page``: also
    a Markdown results page of every table (no figures) headed by the run's provenance (command, commit, date)."""
    from metaunlearn.attacks.prompts import read_prompt_rows
    from metaunlearn.attacks.sweep import aggregate, read_rows, worst_case
    from metaunlearn.experiment.curve_tables import auc_table, prompt_attack_table
    from metaunlearn.experiment.curve_tables import worst_table as worst_runs_table_of
    from metaunlearn.experiment.figures import report_figures
    from metaunlearn.experiment.yardsticks import yardstick_tables

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run dir not found: {run_dir}")
    config = config or ReportConfig()
    out = Path(out_dir) if out_dir else run_dir
    rows = [{**r, "variant": canonical_variant(r["variant"])} for r in read_rows(run_dir)]
    check_one_setting(rows, run_dir)
    if not any(isinstance(r.get(config.metric), (int, float)) for r in rows):
        raise UserError(f"no result row of {run_dir} has the metric {config.metric!r}")
    primary, sets = attack_sets_in_order(rows, config)
    metrics = numeric_metrics(rows)
    summary = [{**a, "std": a["std"] if a["n"] > 1 else None} for m in metrics for a in aggregate(rows, m)]
    worst = [w for m in metrics for w in worst_case(rows, m)]
    main, worst_table, table_data = paper_table(rows, config)
    reductions = [t for t in (reduction_table(rows, config), reduction_table(rows, config, "control")) if t]
    related = None
    if config.related_metric != config.metric and any(isinstance(r.get(config.related_metric), (int, float))
                                                      for r in rows):
        related = paper_table(rows, config.model_copy(update={"metric": config.related_metric}))[0]
        related.note = ("Columns as above. Self-destruct: this falls under attacks on the forget concept but not "
                        "under benign (clean) finetuning. Higher before any attack is better.")
    quality = quality_table(rows, primary)
    models = model_order(rows)
    aucs = auc_table(rows, config.metric, sets, models)
    worst_runs_table, worst_runs_data = worst_runs_table_of(rows, config.metric, primary, models)
    prompt_rows = read_prompt_rows(run_dir)
    prompts = prompt_attack_table(prompt_rows, rows, config.metric, models)
    durability = signals_table(run_dir, rows, config.metric, primary, config.budget_steps)
    yardstick = yardstick_tables(rows, config, models)

    # Every output is staged beside its final path and renamed into place together at the end: a failure (a full
    # disk, a bad path) leaves the previous report whole, and report_assets/ never keeps figures of another run.
    with AtomicFiles() as staged:
        assets = staged.temp_dir(out / ASSETS)
        figs = report_figures(rows, config.metric, METRIC_LABELS.get(config.metric, config.metric),
                              config.related_metric if config.related_metric != config.metric else None,
                              primary, sets, config.budget_steps, assets)
        return _write(staged, out, config, rows, run_dir, primary, sets, metrics, summary, worst, figs, main,
                      worst_table, table_data, reductions, related, quality, aucs, worst_runs_table, worst_runs_data,
                      prompt_rows, prompts, durability, yardstick, page)


def _write(staged: AtomicFiles, out: Path, config: ReportConfig, rows, run_dir: Path, primary: str, sets, metrics,
           summary, worst, figs, main, worst_table, table_data, reductions, related, quality, aucs, worst_runs_table,
           worst_runs_data, prompt_rows, prompts, durability=None, yardstick=None, page=None) -> ReportFiles:
    """Stage every report file in ``staged`` (figures are already in its temporary assets folder)."""
    from metaunlearn.attacks.curves import run_curves
    from metaunlearn.attacks.sweep import KEY_FIELDS

    grid_columns, grids = grid_rows(rows, run_dir, primary)

    n_runs = len({(r["model"], r["attack_set"], r["mode"], r["lr"], r["seed"]) for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    counts = (f"{len({r['model'] for r in rows})} models · attack sets {', '.join(sets)} · "
              f"{n_runs} attack runs · seeds {', '.join(map(str, seeds))}")
    subtitle = f"{counts} · source {run_dir.resolve()}"

    def sections(grid_cells, final: bool) -> list[Section]:
        # HTML embeds the staged figures; Markdown links them where they will be after the commit
        by_name = {path.stem: (out / ASSETS / path.name if final else path, caption) for path, caption in figs}
        relearning = [by_name[n] for n in ("relearning_curves", "relearning_other_sets") if n in by_name]
        destruct = [by_name["self_destruct"]] if "self_destruct" in by_name else []
        s = []
        if relearning:
            s.append(Section("Relearning under attack", figures=relearning))
        s.append(Section("Forget rate before and after finetuning attacks", text=diverged_text(rows),
                         tables=[main, worst_table, *reductions]))
        curve_tables = [t for t in (worst_runs_table, prompts, aucs) if t is not None]
        if curve_tables:
            gone = "The diverged runs named above have no curve and are left out here." if diverged_runs(rows) else ""
            s.append(Section("Relearning curves and the worst case over the sweep", text=gone, tables=curve_tables))
        if yardstick and yardstick["tables"]:
            s.append(Section("Yardsticks: a model that never saw the concept, the attacker's payoff, equal damage",
                             tables=yardstick["tables"]))
        if related or destruct:
            s.append(Section("Related concepts under attack (self-destruct)", figures=destruct,
                             tables=[related] if related else []))
        if quality:
            s.append(Section("Benign concepts and quality", tables=[quality]))
        if durability:
            s.append(Section("Durability signals logged during unlearning", tables=[durability]))
        if grids:
            s.append(Section(f"Samples of the grid prompt set (attack {primary})", grid_rows=grid_cells,
                             grid_columns=grid_columns))
        return s

    results = {"rows": rows, "summary": summary, "worst_case": worst, "table": table_data,
               "curves": run_curves(rows, config.metric), "worst_runs": worst_runs_data,
               "prompt_attacks": prompt_rows,
               "against_reference": (yardstick or {}).get("against_reference", []),
               "payoff": (yardstick or {}).get("payoff", []),
               "primary_set": primary, "attack_sets": sets}
    settings = [k for k in SETTING_FIELDS if k == "grid" or any(k in r for r in rows)]
    columns = list(KEY_FIELDS) + settings + metrics
    summary_columns = ["metric", "model", "method", "variant", "attack_set", "mode", "lr", "step",
                       "mean", "std", "min", "max", "n"]
    page_file = None
    if page is not None:
        from metaunlearn.experiment import provenance

        tables_only = [Section(x.title, x.text, x.tables) for x in sections(grids, True) if x.tables]
        made = provenance.describe(provenance.read(run_dir))
        page_file = staged.write_text(Path(page), render_markdown(config.title, f"{made} {counts}.", tables_only,
                                                                  Path(page).parent))
    return ReportFiles(
        page=page_file,
        results_json=staged.write_text(out / "results.json", json.dumps(results, indent=1, allow_nan=False) + "\n"),
        results_csv=staged.write_text(out / "results.csv", _csv_text(rows, columns)),
        summary_csv=staged.write_text(out / "summary.csv", _csv_text(summary, summary_columns)),
        markdown=staged.write_text(out / "report.md",
                                   render_markdown(config.title, subtitle, sections(grids, True), out)),
        html=staged.write_text(out / "report.html", render_html(config.title, subtitle, sections(grids, False))),
        figures=[out / ASSETS / p.name for p, _ in figs],
    )

