"""``metaunlearn report RUN_DIR``: tables, curves and sample grids of a run's attack results (Markdown + HTML)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from metaunlearn.config import StrictModel, read_sections, validate
from metaunlearn.errors import UserError
from metaunlearn.experiment.report import ReportConfig


class ReportFile(StrictModel):
    """The ``report`` section of a config file (other sections belong to other commands)."""

    model_config = {**StrictModel.model_config, "extra": "ignore"}

    report: ReportConfig = ReportConfig()


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run_dir: Path = typer.Argument(..., help="Run folder holding attacks/<model>/<set>/*.jsonl result rows."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the report (default: RUN_DIR)."),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config whose 'report' section to use."),
        primary_set: Optional[str] = typer.Option(
            None, "--primary-set", help="Attack set shown at every snapshot step (default: hrm-m if present)."
        ),
        metric: Optional[str] = typer.Option(None, "--metric", help="Row metric of the tables (default: forget_rate)."),
        title: Optional[str] = typer.Option(None, "--title", help="Report title."),
        page: Optional[Path] = typer.Option(
            None, "--page", help="Also write every table as one Markdown results page headed by the run's command, "
            "commit and date (e.g. docs/results/demo.md)."
        ),
    ) -> None:
        """Write results.json, results.csv, summary.csv, report.md and a self-contained report.html."""
        from metaunlearn.experiment.report import build_report

        settings = validate(ReportFile, read_sections(config), str(config)).report if config else ReportConfig()
        overrides = {k: v for k, v in (("primary_set", primary_set), ("metric", metric), ("title", title)) if v}
        if overrides:
            settings = settings.model_copy(update=overrides)
        if out is not None and out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder")
        if page is not None and page.is_dir():
            raise UserError(f"--page {page} is a folder; give a Markdown file path")
        _check_owned(out if out is not None else run_dir)
        files = build_report(run_dir, out, settings, page=page)
        console = Console()
        for label, path in (("results", files.results_json), ("rows (csv)", files.results_csv),
                            ("summary (csv)", files.summary_csv), ("markdown", files.markdown), ("html", files.html),
                            *([("results page", files.page)] if files.page else [])):
            console.print(f"{label:>14}: {path}")


REPORT_NAMES = ("results.json", "results.csv", "summary.csv", "report.md", "report.html", "report_assets")


def _check_owned(out: Path) -> None:
    """Refuse to replace report files that an earlier report of metaunlearn did not write (its results.json)."""
    import json

    found = [n for n in REPORT_NAMES if (out / n).exists() or (out / n).is_symlink()]
    if not found:
        return
    try:
        results = json.loads((out / "results.json").read_text())
        ours = isinstance(results, dict) and {"rows", "summary"} <= set(results)
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise UserError(f"{out} holds {', '.join(found[:3])} that no metaunlearn report wrote (no results.json of "
                        "one); choose another --out or move them away")
