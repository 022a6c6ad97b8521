"""``metaunlearn unlearn CONFIG``: erase a concept with ESD, SDD, UCE or RECE, optionally with the meta objective.

See :mod:`metaunlearn.unlearn` for the config (standalone, or an experiment file's ``unlearn:`` section) and the
outputs (``model/``, ``config.json``, ``train_log.jsonl``, ``checkpoint/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    @app.command("unlearn")
    def unlearn(
        config: Path = typer.Argument(..., help="YAML config (the unlearn stage's, or one with an 'unlearn' section); relative paths in it are "
                        "relative to the config file."),
        method: Optional[str] = typer.Option(None, "--method", help="Override the method: esd, sdd, uce or rece."),
        meta: Optional[bool] = typer.Option(
            None, "--meta/--no-meta", help="Add the meta objective (config's 'meta' or defaults) / run plain."
        ),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: the config's 'out', relative to the config file; else "
                                   "<run folder>/<method>[-meta], the run folder being the config's run_dir or runs/<config name>)."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Redo the run when the output folder holds one made with other settings "
            "(by default a run with the same settings resumes from its checkpoint, and other settings are refused)."
        ),
        wait: bool = typer.Option(
            False, "--wait", help="Wait for another metaunlearn process writing the same folder (default: refuse)."
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved plan and exit."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        device_memory: Optional[float] = typer.Option(
            None, "--device-memory", min=0.1, metavar="GB",
            help="With --dry-run: say whether the meta step's predicted peak fits this much device memory (GiB).",
        ),
    ) -> None:
        """Unlearn a concept; writes a diffusers model folder, the resolved config and a JSONL training log."""
        from metaunlearn.methods import get_method
        from metaunlearn.unlearn import load_unlearn_config, run_unlearn
        from metaunlearn.unlearn_plan import describe

        console = Console()
        overrides: dict = {}
        if method is not None:
            get_method(method)  # one-line error for an unknown name
            overrides["method_name"] = method
        if meta is not None:
            overrides["meta"] = meta
        if out is not None:
            overrides["out"] = out
        cfg = load_unlearn_config(config, overrides)
        if dry_run:
            for line in describe(cfg, device_memory):
                console.print(line, markup=False, highlight=False)
            return
        from metaunlearn.locking import waiting_for_locks

        with waiting_for_locks(wait):
            result = run_unlearn(cfg, overwrite=overwrite, progress=not quiet)
        if not result.is_main:  # another process of a data-parallel launch
            return
        if result.skipped:
            console.print(f"already done with these settings: {result.model}", markup=False, highlight=False)
            return
        summary = " ".join(f"{k} {v:.4g}" for k, v in {**result.edit_stats, **result.terms}.items())
        console.print(f"{cfg.variant}: {result.steps} steps {summary}".rstrip(), markup=False, highlight=False)
        console.print(f"model: {result.model}", markup=False, highlight=False)
