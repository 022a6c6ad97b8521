"""``metaunlearn run CONFIG``: every stage a config names (data, unlearning grid, attacks, report), resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        config: Path = typer.Argument(..., help="Experiment YAML (sections: model, data, unlearn, grid, attack, eval, report)."),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", "-o", help="Run folder (default: the config's run_dir, relative to the config file, else runs/<config name> in the working directory)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Validate every section, print the plan and every missing input (with what provides it), and exit; creates nothing."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Redo stages that ran with other settings (by default finished stages with the same settings are skipped and others are refused)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
        wait: bool = typer.Option(
            False, "--wait", help="Wait for another metaunlearn process writing the same folder (default: refuse)."
        ),
        jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Unlearn/attack stages run at once (worker processes; with a local --ray: its CPUs, default every core)."),
        ray: bool = typer.Option(
            False, "--ray", help="Run the unlearn/attack stages as Ray tasks: on a new local Ray instance, or on the "
                                 "cluster of $RAY_ADDRESS or --ray-address (needs pip install 'metaunlearn[ray]').",
        ),
        ray_address: Optional[str] = typer.Option(
            None, "--ray-address", metavar="ADDRESS", help="Ray cluster to use (auto, HOST:6379, ray://HOST:10001); implies --ray.",
        ),
        cpus: int = typer.Option(1, "--cpus-per-stage", min=1, help="CPU cores a Ray task asks for (its torch threads)."),
        gpus: Optional[float] = typer.Option(None, "--gpus-per-stage", min=0, help="GPUs a Ray task asks for (default: 1 if the cluster has GPUs, else 0)."),
        device_memory: Optional[float] = typer.Option(
            None, "--device-memory", min=0.1, metavar="GB",
            help="With --dry-run: say whether each meta stage's predicted peak fits this much device memory (GiB).",
        ),
    ) -> None:
        """Run a whole experiment; stages finished with unchanged settings are skipped. Relative paths in the config
        are relative to the config file."""
        from metaunlearn.commands import invocation
        from metaunlearn.experiment.runner import run_experiment
        from metaunlearn.experiment.schedule import StageResources

        target = ray_address or ("local" if ray else None)
        from metaunlearn.locking import waiting_for_locks

        with waiting_for_locks(wait):
            run_experiment(config, run_dir=run_dir, dry_run=dry_run, progress=not quiet, jobs=jobs, ray=target,
                           resources=StageResources(cpus, gpus), overwrite=overwrite, device_memory=device_memory,
                           command=invocation())
