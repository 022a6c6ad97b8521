"""Checks of an experiment before it runs, none of which writes anything.

``metaunlearn run CONFIG --dry-run`` (:func:`dry_run`) validates every section, prints the plan of stages, every
input that does not exist yet (with what provides it) and each meta stage's predicted peak memory. A real run first
refuses missing inputs (:func:`require_inputs`) and stages already run in its folder with other settings
(:func:`check_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from metaunlearn.config import validate
from metaunlearn.errors import UserError
from metaunlearn.runs import PlannedStage, print_plan

if TYPE_CHECKING:
    from metaunlearn.experiment.runner import Experiment


def validate_sections(experiment: Experiment) -> None:
    """Validate every section a run will use (the unlearn template and each grid model's stage config)."""
    from metaunlearn.unlearn import UnlearnConfig, unlearn_section

    if experiment.config.unlearn is not None:
        raw = {"model": str(experiment.model_dir), "unlearn": dict(experiment.config.unlearn)}
        if experiment.data is not None:
            raw["data"] = experiment.data.model_dump(mode="json")
        validate(UnlearnConfig, unlearn_section(raw, experiment.base, "unlearn"), "unlearn")
    for m in experiment.models():
        if m.entry is not None:
            experiment.unlearn_config(m).method.build()


def missing_inputs(experiment: Experiment) -> list[tuple[str, str]]:
    """``(path, what provides it)`` for every input of the run that does not exist yet and no stage makes."""
    from metaunlearn.config import resolve_path

    config, base, data = experiment.config, experiment.base, experiment.data
    missing: list[tuple[str, str]] = []

    def need(path: str | Path | None, fix: str) -> None:
        if path is not None and not Path(path).exists():
            missing.append((str(path), fix))

    need(experiment.model_dir, "edit 'model': a local diffusers model folder (safetensors weights)")
    for i, ref in enumerate(config.references):
        need(resolve_path(ref.path, base), f"edit references.{i}.path: a local diffusers model folder")
    if data is not None:
        for role in data.roles():
            spec = data.role(role)
            if spec.generated:
                need(spec.prompt_file, f"edit data.{role}.prompt_file")
                need(spec.test_prompt_file, f"edit data.{role}.test_prompt_file")
            else:
                for split in ("train", "test"):
                    need(data.split_folder(role, split),
                         f"edit data.{role}.folder (a folder holding train/ and test/ image folders), or "
                         f"give prompts to generate it: `metaunlearn run` then makes it")
    if config.attack is not None:
        for name, spec in config.attack.sets.items():
            if name not in config.attack_data and spec.data:
                path = resolve_path(spec.data, base)
                need(path, f"make it with `metaunlearn generate {experiment.model_dir} --prompt-file PROMPTS "
                           f"--out {path}`, edit attack.sets.{name}.data, or add attack_data.{name} (prompts) "
                           "so the run generates it")
    if config.eval is not None:
        ev = config.eval
        for i, ps in enumerate(ev.prompt_sets):
            if ps.prompts_file:
                need(resolve_path(ps.prompts_file, base), f"edit eval.prompt_sets.{i}.prompts_file")
        for key, value in (("detector.path", ev.detector.path), ("quality.fid_features_path",
                           ev.quality.fid_features_path), ("quality.fid_reference", ev.quality.fid_reference),
                           ("quality.clip_score_path", ev.quality.clip_score_path)):
            if value:
                need(resolve_path(value, base), f"edit eval.{key}")
    return missing


def require_inputs(experiment: Experiment) -> None:
    """Refuse (one line) a run with an input that does not exist and no stage makes, before anything is written."""
    missing = missing_inputs(experiment)
    if missing:
        where, fix = missing[0]
        more = f" (and {len(missing) - 1} more; see --dry-run)" if len(missing) > 1 else ""
        raise UserError(f"input not found: {where}: {fix}{more}")


def memory_lines(experiment: Experiment, device_memory: float | None = None) -> list[str]:
    """The meta step's memory plan of every distinct meta stage setting (architecture of the base model)."""
    from metaunlearn.unlearn_plan import memory_plan

    lines, seen = [], set()
    for models in experiment.models_by_seed().values():
        for m in models:
            if m.entry is None:
                continue
            config = experiment.unlearn_config(m)
            if config.meta is None:
                continue
            key = (config.meta.model_dump_json(), config.trainable, config.mixed_precision, config.method.name)
            if key in seen:
                continue
            seen.add(key)
            plan = memory_plan(config, model=experiment.model_dir)
            if plan is not None:
                lines += [f"{m.key}: {line}" if i == 0 else line for i, line in enumerate(plan.lines(device_memory))]
    return lines


def plan(experiment: Experiment) -> list[PlannedStage]:
    """Every stage of the run in order: its input, what it reads, what it writes and whether it is done."""
    config, data, run = experiment.config, experiment.data, experiment.run
    model_dir = str(experiment.model_dir)
    stages: list[PlannedStage] = []
    if data is not None:
        folders = [str(data.split_folder(r, s)) for r in data.roles() for s in ("train", "test")]
        stages.append(PlannedStage("data", model_dir, (), folders, run.is_done("data")))
    for name, folder in experiment.attack_folders().items():
        stages.append(PlannedStage(f"attack data {name}", model_dir, (), [str(folder)],
                                   run.is_done(f"attack-data-{name}")))
    sets = list(config.attack.sets) if config.attack is not None else []
    for models in experiment.models_by_seed().values():
        for m in models:
            if m.entry is not None:
                start = experiment.unlearn_config(m).model
                stages.append(PlannedStage(f"unlearn {m.key}", str(start),
                                           [r for r in (data.roles() if data else [])],
                                           [str(experiment.model_folder(m))], run.is_done(f"unlearn-{m.key}")))
        if config.attack is not None:
            for m in models:
                stages.append(PlannedStage(f"attack {m.key}", str(experiment.model_folder(m)), sets,
                                           [str(run.path / "attacks" / m.name)], run.is_done(f"attack-{m.key}")))
    if config.attack is not None:
        stages.append(PlannedStage("report", "", [str(run.path / "attacks")], [str(run.path / "report.html")]))
    return stages


def dry_run(experiment: Experiment, config_path: str | Path, device_memory: float | None = None) -> None:
    """Validate every section and print the plan, the missing inputs and the meta stages' memory plans
    (whether each fits ``device_memory`` GiB); creates nothing."""
    console = experiment.console
    validate_sections(experiment)
    print_plan(plan(experiment), console, title=f"plan for {config_path} -> {experiment.run.path}")
    missing = missing_inputs(experiment)
    if missing:
        console.print(f"[bold]{len(missing)} input(s) missing[/] (edit {config_path} or create them first):")
        for where, fix in missing:
            console.print(f"  {where}: {fix}", markup=False, highlight=False)
    else:
        console.print("every input exists")
    for line in memory_lines(experiment, device_memory):
        console.print(line, markup=False, highlight=False)


def stage_settings(experiment: Experiment) -> list[tuple[str, object]]:
    """``(stage, settings)`` of every stage of the run, in order (the report excluded: it is always rebuilt)."""
    out: list[tuple[str, object]] = []
    if experiment.data is not None:
        out.append(("data", experiment.data))
    for name in experiment.attack_folders():
        out.append((f"attack-data-{name}", experiment.config.attack_data[name]))
    for seed in experiment.models_by_seed():
        out += [(t.stage, experiment.task_settings(t)) for t in experiment.tasks(seed)]
    return out


def check_settings(experiment: Experiment) -> None:
    """Before any work: refuse (one line) when a stage already run in this folder had other settings, unless the
    experiment overwrites; so a changed config never mixes old and new results."""
    if experiment.overwrite:
        return
    run = experiment.run
    changed = [(stage, status) for stage, settings in stage_settings(experiment)
               if (status := run.status(stage, settings)).state == "changed"]
    if changed:
        stage, status = changed[0]
        more = f" and {len(changed) - 1} more stage(s)" if len(changed) > 1 else ""
        raise UserError(f"{run.path}: stage {stage}{more} ran with other settings ({status.describe()} "
                        "changed); pass --overwrite to redo them, or choose another run folder")
