"""The main job: the packaged toy experiment (``configs/toy_demo.yaml``), with ``--quick`` and ``--seeds`` variants."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from rich.console import Console

from metaunlearn.errors import UserError
from metaunlearn.experiment.runner import Experiment, load_experiment


def demo_config_path() -> Path:
    """The packaged demo config (inside the installed package, next to the shipped toy model)."""
    return Path(str(resources.files("metaunlearn") / "configs" / "toy_demo.yaml"))


def build_demo(quick: bool = False, seeds: int = 1, run_dir: Path | None = None, console: Console | None = None) -> Experiment:
    """The demo experiment: the full grid, or ``quick`` (shorter attacks, fewer samples) for a smoke run.

    ``seeds`` > 1 replicates the whole grid (unlearning and attacks) under seeds 0..N-1; the report then gives
    mean ± std over them.
    """
    if seeds < 1:
        raise UserError("--seeds must be at least 1")
    config, _, base = load_experiment(demo_config_path())
    grid = config.grid.model_copy(update={"seeds": list(range(seeds))})
    attack = config.attack
    ev = config.eval
    default_dir = Path(config.run_dir or "runs/demo")
    if quick:
        attack = attack.model_copy(update={"snapshot_steps": [0, 25, 50]})
        ev = ev.model_copy(update={"samples_per_prompt": 8})
        default_dir = default_dir.with_name(default_dir.name + "-quick")
    if seeds > 1:
        default_dir = default_dir.with_name(f"{default_dir.name}-{seeds}seeds")
    config = config.model_copy(update={"grid": grid, "attack": attack, "eval": ev})
    return Experiment(config, base, run_dir or default_dir, console)
