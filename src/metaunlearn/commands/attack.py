"""``metaunlearn attack MODEL_DIR CONFIG``: relearning attacks on a released model, evaluated at snapshot steps.

Reads the config's ``attack`` section (:class:`~metaunlearn.attacks.config.AttackSuiteConfig`) and ``eval``
section (:class:`~metaunlearn.metrics.config.EvalConfig`; optional — without it only the attack loss is
recorded). Other sections belong to other commands. Results go to ``RUN_DIR/attacks/<name>/…`` (one JSONL file per
attack run) and sample grids to ``RUN_DIR/grids/<name>/…``; see :mod:`metaunlearn.attacks.sweep`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from pydantic import Field
from rich.console import Console
from rich.table import Table

from metaunlearn.attacks.config import AttackSuiteConfig
from metaunlearn.config import StrictModel, read_yaml, validate
from metaunlearn.errors import UserError
from metaunlearn.metrics.config import EvalConfig


class AttackFile(StrictModel):
    """The parts of a config file ``attack`` reads (other sections are validated by their own commands)."""

    model_config = {**StrictModel.model_config, "extra": "ignore"}

    attack: AttackSuiteConfig
    eval: Optional[EvalConfig] = Field(None)


def load_attack_file(path: Path) -> AttackFile:
    data = read_yaml(path)
    if "attack" not in data:
        raise UserError(f"{path}: no 'attack' section")
    return validate(AttackFile, data, str(path))


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def load_attack_sets(backbone, suite: AttackSuiteConfig, base: Path, run_dir: Path, only: list[str] | None,
                     progress: bool) -> dict:
    """The :class:`CachedSet` of every selected attack set and of the sets sequential attacks train on first
    (imagefolders are encoded once and cached)."""
    from metaunlearn.data.caching import load_set

    names = list(suite.sets)
    for name in only or []:
        if name not in suite.sets:
            raise UserError(f"unknown attack set {name!r} (config defines: {', '.join(names)})")
    cache_dir = _resolve(suite.cache_dir, base) if suite.cache_dir else run_dir / "cache"
    sets = {}
    for name in [n for n in names if n in (only or names) or n in suite.stage_sets()]:
        if not suite.sets[name].data:
            raise UserError(f"attack set '{name}' names no data folder")
        path = _resolve(suite.sets[name].data, base)
        data = load_set(backbone, path, cache_dir, f"attack set '{name}'", progress)
        sets[name] = data.to(backbone.device)
    return sets


def _summary(rows: list[dict], console: Console) -> None:
    from metaunlearn.attacks.sweep import aggregate

    from metaunlearn.experiment.formatting import format_lr, mean_std, seeds_phrase

    metric = "forget_rate" if any("forget_rate" in r for r in rows) else "attack_loss"
    stats = aggregate(rows, metric, by=("attack_set", "mode", "lr", "step"))
    table = Table(title=f"{metric} ({seeds_phrase(a['n'] for a in stats)})")
    for column in ("attack set", "mode", "lr", "step", metric, "runs"):
        table.add_column(column)
    for a in stats:
        table.add_row(a["attack_set"], a["mode"], format_lr(a["lr"]), str(a["step"]),
                      mean_std(a["mean"], a["std"], a["n"]), str(a["n"]))
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("attack")
    def attack(
        model_dir: Path = typer.Argument(..., help="Diffusers model folder to attack (the released, unlearned model)."),
        config: Path = typer.Argument(..., help="YAML config with an 'attack' section (and 'eval' to measure)."),
        run_dir: Optional[Path] = typer.Option(
            None, "--run-dir", "-o", help="Run folder for results (default: runs/<config name>)."
        ),
        name: Optional[str] = typer.Option(None, "--name", help="Model name in results (default: folder name)."),
        method: Optional[str] = typer.Option(None, "--method", help="Base method label, e.g. esd (default: from name)."),
        variant: Optional[str] = typer.Option(
            None, "--variant", help="base, plain or meta (default: 'meta' if the name ends in -meta, else plain)."
        ),
        sets: Optional[list[str]] = typer.Option(None, "--set", help="Only this attack set (repeatable)."),
        resume: bool = typer.Option(True, "--resume/--no-resume", help="Skip attack runs already complete."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        dtype: str = typer.Option("fp32", "--dtype", help="fp32 (recommended for finetuning), fp16 or bf16."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ) -> None:
        """Finetune a model on each attack set (full / LoRA × lrs × seeds) and evaluate every snapshot step."""
        from metaunlearn.attacks.sweep import ModelInfo, run_sweep
        from metaunlearn.backbones.loading import inspect_model_folder, load_backbone
        from metaunlearn.commands.generate import resolve_dtype
        from metaunlearn.runs import atomic_write_text, ensure_dir
        from metaunlearn.training.accel import make_accelerator, stage_device
        from metaunlearn.training.parallel import Shard

        console = Console()
        parsed = load_attack_file(config)
        base = config.resolve().parent
        info = ModelInfo.infer(name or model_dir.resolve().name, method, variant)
        if info.variant not in ("base", "plain", "meta"):
            raise UserError(f"--variant must be base, plain or meta, not {info.variant!r}")
        inspect_model_folder(model_dir)
        evaluator = None
        if parsed.eval is not None:
            from metaunlearn.metrics.evaluate import Evaluator

            evaluator = Evaluator(parsed.eval, base_dir=base)
        # under torchrun / accelerate launch: data parallel, bf16 autocast and accumulation from the launcher
        accelerator = make_accelerator(None, None, cpu=device == "cpu")
        dev = stage_device(device, accelerator)
        main = accelerator.is_main_process
        run_dir = ensure_dir(run_dir or Path("runs") / config.stem)
        backbone = load_backbone(model_dir, device=dev, dtype=resolve_dtype(dtype, dev))
        with accelerator.main_process_first():
            data = load_attack_sets(backbone, parsed.attack, base, run_dir, sets, not quiet and main)
        resolved = {"model": str(model_dir.resolve()), "name": info.name, "method": info.method,
                    "variant": info.variant, "attack": parsed.attack.model_dump(mode="json"),
                    "eval": parsed.eval.model_dump(mode="json") if parsed.eval else None}
        if main:
            atomic_write_text(run_dir / "attacks" / info.name / "config.json", json.dumps(resolved, indent=2) + "\n")
        rows = run_sweep(backbone, data, parsed.attack, run_dir, info, evaluator, progress=not quiet, resume=resume,
                         cache_dir=run_dir / "cache", only=sets, shard=Shard.of(accelerator), autocast=accelerator.autocast)
        accelerator.wait_for_everyone()
        if not main:  # another process of a data-parallel launch: the main one evaluates, writes and reports
            return
        if parsed.attack.prompt_attacks:
            from metaunlearn.attacks.prompts import run_prompt_attacks

            run_prompt_attacks(backbone, parsed.attack.prompt_attacks, parsed.attack.seeds, evaluator, run_dir, info,
                               data.get(parsed.attack.concept_set), resume=resume, progress=not quiet)
        _summary(rows, console)
        console.print(f"results: {run_dir / 'attacks' / info.name}  (report: metaunlearn report {run_dir})")
