"""``metaunlearn run CONFIG``: every stage a config names (data, unlearning grid, attacks, report), resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        config: Path = typer.Argument(..., help="Experiment YAML (sections: model, data, unlearn, grid, attack, eval, report)."),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", "-o", help="Run folder (default: config's run_dir or runs/<config name>)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (stages, models, data, outputs) and exit."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
        jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Unlearn/attack stages run in this many processes at once."),
    ) -> None:
        """Run a whole experiment; stages finished with unchanged settings are skipped."""
        from metaunlearn.experiment.runner import run_experiment

        run_experiment(config, run_dir=run_dir, dry_run=dry_run, progress=not quiet, jobs=jobs)
