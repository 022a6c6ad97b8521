"""``metaunlearn attack MODEL_DIR CONFIG``: relearning attacks on a released model, evaluated at snapshot steps.

Reads the config's ``attack`` section (:class:`~metaunlearn.attacks.suite_config.AttackSuiteConfig`) and ``eval``
section (:class:`~metaunlearn.metrics.config.EvalConfig`; optional — without it only the attack loss is
recorded). Other sections belong to other commands. Results go to ``RUN_DIR/attacks/<name>/…`` (one JSONL file per
attack run) and sample grids to ``RUN_DIR/grids/<name>/…``; see :mod:`metaunlearn.attacks.sweep`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from pydantic import Field
from rich.console import Console
from rich.table import Table

from metaunlearn.attacks.reference import ReferenceModel
from metaunlearn.attacks.suite_config import AttackSuiteConfig
from metaunlearn.config import StrictModel, read_sections, validate
from metaunlearn.errors import UserError
from metaunlearn.metrics.config import EvalConfig


class AttackFile(StrictModel):
    """The parts of a config file ``attack`` reads (other sections are validated by their own commands)."""

    model_config = {**StrictModel.model_config, "extra": "ignore"}

    attack: AttackSuiteConfig
    eval: Optional[EvalConfig] = Field(None)
    run_dir: Optional[str] = Field(None)
    references: list[ReferenceModel] = Field(default_factory=list)


def load_attack_file(path: Path) -> AttackFile:
    data = read_sections(path)
    if "attack" not in data:
        raise UserError(f"{path}: no 'attack' section")
    return validate(AttackFile, data, str(path))


def _summary(rows: list[dict], console: Console) -> None:
    from metaunlearn.attacks.sweep import aggregate

    from metaunlearn.formatting import format_lr, mean_std, seeds_phrase

    metric = "forget_rate" if any("forget_rate" in r for r in rows) else "attack_loss"
    stats = aggregate(rows, metric, by=("attack_set", "mode", "lr", "step"))
    table = Table(title=f"{metric} ({seeds_phrase(a['n'] for a in stats)})")
    for column in ("attack set", "mode", "lr", "step", metric, "runs"):
        table.add_column(column)
    for a in stats:
        table.add_row(a["attack_set"], a["mode"], format_lr(a["lr"]), str(a["step"]),
                      mean_std(a["mean"], a["std"], a["n"]), str(a["n"]))
    console.print(table)


def _reference_summary(records: list[dict], console: Console) -> None:
    from metaunlearn.formatting import attack_label

    table = Table(title="against a model that never saw the concept (excess AUC, points; steps to 50%)")
    for column in ("reference", "attack set", "attack", "excess AUC", "steps to 50%", "reference's", "seeds"):
        table.add_column(column)
    for r in records:
        steps = [("—" if s["mean"] is None else f"{s['mean']:.0f}") for s in (r["steps_to"], r["reference_steps_to"])]
        table.add_row(r["reference"], r["attack_set"], attack_label(r["mode"], r["lr"]), f"{r['excess_all']:+.1f}",
                      *steps, str(len(r["seeds"])))
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("attack")
    def attack(
        model_dir: Path = typer.Argument(..., help="Diffusers model folder to attack (the released, unlearned model)."),
        config: Path = typer.Argument(..., help="YAML config with an 'attack' section (and 'eval' to measure); "
                                      "relative paths in it are relative to the config file."),
        run_dir: Optional[Path] = typer.Option(
            None, "--run-dir", "-o", help="Run folder for results (default: the config's run_dir, relative to the "
            "config file, else runs/<config name> in the working directory)."
        ),
        name: Optional[str] = typer.Option(
            None, "--name", help="Name of the model in results (default: <method>-<variant> from the model folder's "
            "unlearn_config.json, or 'base' for a model metaunlearn did not unlearn)."
        ),
        method: Optional[str] = typer.Option(
            None, "--method", help="Base method label of a model without unlearn_config.json (e.g. esd)."
        ),
        variant: Optional[str] = typer.Option(
            None, "--variant", help="base, plain or meta, for a model without unlearn_config.json."
        ),
        sets: Optional[list[str]] = typer.Option(None, "--set", help="Only this attack set (repeatable)."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace results in the run folder made with other settings or another model "
            "(by default finished runs with the same settings are kept and missing ones run; others are refused)."
        ),
        wait: bool = typer.Option(
            False, "--wait", help="Wait for another metaunlearn process writing the same folder (default: refuse)."
        ),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        dtype: str = typer.Option(
            "fp32", "--dtype", help="fp32 (recommended for finetuning; the only one on CPU), fp16 or bf16 (GPU)."
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
        reference: Optional[list[Path]] = typer.Option(
            None, "--reference", help="A model that never saw the concept, attacked alike as the yardstick "
            "(repeatable; adds to the config's references)."
        ),
    ) -> None:
        """Finetune a model on each attack set (full / LoRA × lrs × seeds) and evaluate every snapshot step."""
        from metaunlearn.api import attack as attack_api
        from metaunlearn.config import default_run_dir

        from metaunlearn.locking import waiting_for_locks

        parsed = load_attack_file(config)
        references = [*parsed.references, *[p.resolve() for p in reference or []]]
        with waiting_for_locks(wait):
            result = attack_api(
                model_dir, parsed.attack, run_dir or default_run_dir(config, parsed.run_dir), eval=parsed.eval,
                base_dir=config.resolve().parent, name=name, method=method, variant=variant, sets=sets,
                overwrite=overwrite, device=device, dtype=dtype, progress=not quiet, references=references,
            )
        if not result.is_main:  # another process of a data-parallel launch: the main one writes and reports
            return
        console = Console()
        if result.skipped_sets:
            console.print(f"already done with these settings: {', '.join(result.skipped_sets)}")
        _summary(result.rows, console)
        if result.references:
            from metaunlearn.attacks.reference import against_reference

            rows = result.rows + [r for ref in result.references for r in ref.rows]
            records = against_reference(rows, [ref.name for ref in result.references],
                                        metric="forget_rate" if any("forget_rate" in r for r in rows) else "attack_loss")
            _reference_summary([r for r in records if r["model"] == result.name], console)
        console.print(f"results: {result.run_dir / 'attacks' / result.name}  "
                      f"({result.method} {result.variant}, model {result.fingerprint}; "
                      f"report: metaunlearn report {result.run_dir})", markup=False, highlight=False)
