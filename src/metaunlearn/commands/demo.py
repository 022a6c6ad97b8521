"""``metaunlearn demo``: the whole pipeline on the embedded concept world (the README's main command)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        quick: bool = typer.Option(False, "--quick", help="UCE plain and meta under the primary attack only (a few minutes)."),
        robust: bool = typer.Option(False, "--robust", help="UCE plain and meta against a wide grid of attacks the defence never simulated (configs/toy_robust.yaml)."),
        seeds: int = typer.Option(1, "--seeds", help="Replicates of the whole grid (unlearning + attacks) under seeds 0..N-1; mean ± std in the report."),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", "-o", help="Run folder (default: runs/demo, runs/demo-quick, runs/demo-robust or runs/demo-Nseeds in the working directory)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Redo stages that ran with other settings (by default they are refused)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
        wait: bool = typer.Option(
            False, "--wait", help="Wait for another metaunlearn process writing the same folder (default: refuse)."
        ),
        all_attacks: bool = typer.Option(False, "--all-attacks", help="Add DreamBooth, textual inversion, cross-attention SGD, related-first sequential finetuning and three prompt attacks (soft prompt, Ring-A-Bell concept vector, hard-prompt search) beside the finetuning attacks; own run dir."),
        jobs: int = typer.Option(0, "--jobs", "-j", min=0, help="Unlearn/attack stages run in this many processes at once (0: one per CPU core; with --quick: 1, its time is one meta stage that then gets every core)."),
    ) -> None:
        """ESD, SDD, UCE and RECE, plain and meta, on the toy world: unlearn, attack, evaluate, report."""
        from metaunlearn.experiment import preflight
        from metaunlearn.experiment.demo import build_demo
        from metaunlearn.runs import print_plan

        experiment = build_demo(quick=quick, seeds=seeds, run_dir=run_dir, all_attacks=all_attacks,
                                create=not dry_run, overwrite=overwrite, robust=robust)
        if dry_run:
            print_plan(preflight.plan(experiment), experiment.console, title=f"demo plan -> {experiment.run.path}")
            return
        from metaunlearn.commands import invocation
        from metaunlearn.locking import waiting_for_locks

        with waiting_for_locks(wait):
            experiment.run_all(progress=not quiet, jobs=jobs or (1 if quick else os.cpu_count() or 1),
                               command=invocation())
