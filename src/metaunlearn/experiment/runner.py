"""Run a whole experiment: data -> unlearning grid -> relearning attacks -> report, resuming finished stages.

Layout of ``RUN_DIR``::

    config.json                    the fully resolved experiment config
    stages/<stage>.json            markers (state + full settings): done stages with the same settings are skipped,
                                   started ones resumed, changed ones refused unless overwrite
    logs/<stage>.log               output of a stage run by a worker process or a Ray task (see schedule.py)
    data/                          concept data (unless the config's data.root, relative to the config file, says otherwise)
    attack_data/<set>/             attack sets generated from the base model
    models/<method>-<variant>/     unlearned models (model/ is a plain diffusers folder) + their training logs
    models/<method>-<variant>.s<k>/  the same for grid seed k > 0 (replicates; results keep the model's name)
    attacks/ grids/ cache/         attack results (see metaunlearn.attacks.sweep)
    report.md report.html ...      the report (see metaunlearn.experiment.report)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from metaunlearn.config import read_yaml, validate
from metaunlearn.errors import UserError
from metaunlearn.experiment import preflight
from metaunlearn.experiment.config import ExperimentConfig
from metaunlearn.experiment.grid import GridModel, Task
from metaunlearn.experiment.schedule import StageResources
from metaunlearn.runs import RunDir

STAGES = ("data", "unlearn", "attack", "report")


def _resolve(path: str | Path, base: Path) -> Path:
    from metaunlearn.config import resolve_path

    return resolve_path(path, base)


def load_experiment(path: str | Path) -> tuple[ExperimentConfig, dict[str, Any], Path]:
    """``(config, raw YAML mapping, config folder)``; paths in the config are relative to its folder."""
    path = Path(path)
    raw = read_yaml(path)
    config = validate(ExperimentConfig, raw, str(path))
    return config, raw, path.resolve().parent


class Experiment:
    """One experiment config bound to its run directory."""

    def __init__(self, config: ExperimentConfig, base: Path, run_dir: Path, console: Console | None = None,
                 *, create: bool = True, overwrite: bool = False) -> None:
        self.config = config
        self.base = base
        # absolute: stage configs resolve paths against other folders; a dry run creates nothing
        self.run = RunDir(Path(run_dir).resolve(), create=create)
        self.console = console or Console()
        self.overwrite = overwrite  # redo stages whose outputs were made with other settings
        self.model_dir = _resolve(config.model, base)
        data = config.data.resolve_paths(base, self.run.path / "data") if config.data is not None else None
        if data is not None and config.data.cache_dir is None:
            data = data.model_copy(update={"cache_dir": self.run.path / "cache"})
        self.data = data

    # ---- the models of the grid -----------------------------------------------------------------------------
    def models(self) -> list[GridModel]:
        """Every model of the grid, seed by seed (a partial run thus holds whole replicates first)."""
        grid = self.config.grid
        refs = self.config.references
        if grid is None:
            return [GridModel("base", "base", "base")] + [self._reference(r, 0) for r in refs]
        out: list[GridModel] = []
        for seed in grid.seeds:
            if grid.include_base:
                out.append(GridModel("base", "base", "base", seed=seed))
            out += [self._reference(r, seed) for r in refs]
            for entry in grid.methods:
                for variant in grid.variants:
                    out.append(GridModel(f"{entry.model_label}-{variant}", entry.name, variant, entry, seed))
                if entry.control is not None:
                    out.append(GridModel(f"{entry.model_label}-control", entry.name, "control", entry, seed))
        return out

    def _reference(self, ref, seed: int) -> GridModel:
        return GridModel(ref.name, "reference", "reference", seed=seed, folder=_resolve(ref.path, self.base))

    def models_by_seed(self) -> dict[int, list[GridModel]]:
        """The grid's models by grid seed, seeds in order."""
        out: dict[int, list[GridModel]] = {}
        for m in self.models():
            out.setdefault(m.seed, []).append(m)
        return out

    def model_folder(self, model: GridModel) -> Path:
        if model.folder is not None:
            return model.folder
        if model.entry is None:
            return self.model_dir
        return self.run.path / "models" / model.key / "model"

    def unlearn_config(self, model: GridModel):
        """The unlearn stage config of one grid model: the template with this method, variant and output."""
        from metaunlearn.unlearn import UnlearnConfig, unlearn_section

        assert model.entry is not None and self.config.unlearn is not None
        section = dict(self.config.unlearn)
        entry = model.entry
        meta = model.variant == "meta"
        control = entry.control if model.variant == "control" else None  # plain unlearning, pushed harder
        params = {**entry.params, **entry.meta_params} if meta else entry.params
        if control is not None:
            params = {**params, **control.params}
        section["method"] = {"name": entry.name, "params": params}
        if not meta:
            section["meta"] = None
        else:
            section["meta"] = {**(section.get("meta") or {}), **entry.meta}
        steps = entry.meta_steps if meta and entry.meta_steps else entry.steps
        if control is not None and control.steps is not None:
            steps = control.steps
        if steps is not None:
            section["steps"] = steps
        lr = entry.meta_lr if meta and entry.meta_lr else entry.lr
        if control is not None and control.lr is not None:
            lr = control.lr
        if lr is not None:
            section["lr"] = lr
        section["seed"] = int(section.get("seed", 0)) + model.seed
        start = self.model_dir
        if model.from_plain:
            start = self.model_folder(model.plain_twin())
        section["model"] = str(start)
        section["out"] = str(self.run.path / "models" / model.key)
        if section.get("signals", {}) is not None:  # distances from the base model, for every model alike
            section["signals"] = {**(section.get("signals") or {}), "reference": str(self.model_dir)}
        raw = {"model": str(start), "unlearn": section}
        if self.data is not None:
            raw["data"] = self.data.model_dump(mode="json")
        return validate(UnlearnConfig, unlearn_section(raw, self.base, "unlearn"), f"unlearn ({model.key})")

    def attack_folders(self) -> dict[str, Path]:
        return {name: self.run.path / "attack_data" / name for name in self.config.attack_data}

    # ---- stages ----------------------------------------------------------------------------------------------
    def run_all(self, *, progress: bool = True, jobs: int = 1, ray: str | None = None,
                resources: StageResources | None = None, command: str | None = None) -> Path | None:
        """Every stage, skipping finished ones; the report comes last.

        Data and attack sets are made here; the unlearn and attack stages of every seed (:meth:`tasks`) go to the
        scheduler (:mod:`metaunlearn.experiment.schedule`), each starting as soon as the model it needs exists:
        ``jobs`` = 1 runs them in this process, one after another; ``jobs`` > 1 in that many worker processes,
        each with ``cpu_count // jobs`` torch threads (small models train faster this way than with every thread
        in one process); ``ray`` = ``"local"`` (a new local Ray instance with every core, or ``jobs`` stages at
        once if ``jobs`` > 1; the cluster of ``$RAY_ADDRESS`` if set) or a cluster address runs them as Ray tasks requesting ``resources``. A report is written whenever every stage of a
        grid seed has finished (so a partial run is still a table), the final one last. The run folder is locked
        for the whole run (:mod:`metaunlearn.locking`); its worker processes write under this lock.
        """
        from metaunlearn.locking import folder_lock

        with folder_lock(self.run.path, "run folder"):
            return self._run_all(progress, jobs, ray, resources, command)

    def _run_all(self, progress: bool, jobs: int, ray: str | None, resources: StageResources | None,
                 command: str | None) -> Path | None:
        from metaunlearn.backbones.loading import load_backbone
        from metaunlearn.experiment import provenance
        from metaunlearn.experiment.report import build_report
        from metaunlearn.experiment.schedule import InProcess, ProcessPool, RayBackend, run_graph

        preflight.check_settings(self)
        if not (self.run.path / "config.json").exists():  # another config's record is replaced once its stages ran
            self.run.write_config(self.config)
        provenance.record(self.run.path, command)
        began = time.time()
        base_backbone = None

        def base():
            nonlocal base_backbone
            if base_backbone is None:
                base_backbone = load_backbone(self.model_dir)
            return base_backbone

        if self.data is not None:
            self._stage("data", self.data, lambda: self._make_data(base(), progress))
        for name, folder in self.attack_folders().items():
            spec = self.config.attack_data[name]
            self._stage(f"attack-data-{name}", spec, lambda s=spec, f=folder: self._make_attack_set(base(), s, f, progress))
        base_backbone = None  # workers load their own models
        seeds = list(self.models_by_seed())
        tasks = [t for seed in seeds for t in self.tasks(seed)]
        resources = resources or StageResources()

        def backend():
            if ray is not None:
                local = ray == "local" and not os.environ.get("RAY_ADDRESS")
                cpus = jobs * resources.cpus if local and jobs > 1 else None  # None: every core of this machine
                return RayBackend(self, None if local else ray, resources, num_cpus=cpus)
            return ProcessPool(self, jobs) if jobs > 1 else InProcess(self, progress)
        left = {seed: {t.stage for t in self.tasks(seed)} for seed in seeds}

        def seed_report(task: Task) -> None:
            left[task.model.seed].discard(task.stage)
            seed = task.model.seed
            if not left[seed] and self.config.attack is not None and seed != seeds[-1]:
                files = build_report(self.run.path, self.run.path, self.config.report)
                self.console.print(f"report after seed {seed}: {files.html}")

        run_graph(self, tasks, backend, progress=progress, on_done=seed_report)
        self.run.write_config(self.config)
        if self.config.attack is None:
            return None
        files = build_report(self.run.path, self.run.path, self.config.report)
        self.console.print(f"[bold]done[/] in {time.time() - began:.0f} s; report: {files.html}")
        return files.html

    def tasks(self, seed: int) -> list[Task]:
        """The unlearn and attack stages of grid seed ``seed`` in run order, each with the stages it waits for."""
        models = self.models_by_seed()[seed]
        out: list[Task] = []
        for m in models:
            if m.entry is None:
                continue
            after = (f"unlearn-{m.plain_twin().key}",) if m.from_plain else ()
            out.append(Task(f"unlearn-{m.key}", "unlearn", m, after, self.overwrite))
        if self.config.attack is not None:
            for m in models:
                out.append(Task(f"attack-{m.key}", "attack", m, () if m.entry is None else (f"unlearn-{m.key}",),
                                self.overwrite))
        return out

    def task_settings(self, task: Task) -> dict:
        """The full settings of a task's stage, as its marker holds them."""
        return self._task_work(task, False)[0]

    def is_done(self, task: Task) -> bool:
        """The task's stage finished with its current settings (its marker says so)."""
        return self.run.is_done(task.stage, self.task_settings(task))

    def run_task(self, task: Task, progress: bool = True) -> None:
        """One unlearn or attack stage (skipped when done with the same settings)."""
        self.overwrite = self.overwrite or task.overwrite  # a worker process learns it from the task
        settings, work = self._task_work(task, progress)
        self._stage(task.stage, settings, work)

    def _task_work(self, task: Task, progress: bool):
        m = task.model
        if task.kind == "unlearn":
            cfg = self.unlearn_config(m)
            return self._unlearn_settings(m), lambda: self._unlearn(cfg, progress)
        suite = self._suite(m.seed)
        settings = {"model": self._unlearn_settings(m) if m.entry is not None else str(self.model_folder(m)),
                    "suite": suite.model_dump(mode="json"),
                    "eval": self.config.eval.model_dump(mode="json") if self.config.eval else None}
        return settings, lambda: self._attack(m, suite, progress)

    def _unlearn_settings(self, m: GridModel) -> dict:
        """An unlearn stage's settings: its config, the data stage's (rebuilt data rebuild the model) and, for a
        meta model started from its plain twin, the twin's (a rebuilt plain model rebuilds this one)."""
        settings = {"unlearn": self.unlearn_config(m).model_dump(mode="json"),
                    "data": self.data.model_dump(mode="json") if self.data is not None else None}
        if m.from_plain:
            settings["from"] = self._unlearn_settings(m.plain_twin())
        return settings

    def _stage(self, stage: str, settings, work) -> None:
        status = self.run.begin(stage, settings, overwrite=self.overwrite, what=f"stage {stage} of {self.run.path}")
        if status.state == "done":
            self.console.print(f"[dim]skip {stage} (done)[/]")
            return
        self.console.print(f"[bold cyan]stage[/] {stage}")
        began = time.time()
        work()
        self.run.mark_done(stage, settings, seconds=round(time.time() - began, 1))

    def _make_data(self, backbone, progress: bool) -> None:
        from metaunlearn.data.generate import generate_data

        generate_data(backbone, self.data, overwrite=self.overwrite, progress=progress)

    def _make_attack_set(self, backbone, spec, folder: Path, progress: bool) -> None:
        from metaunlearn.data.config import SamplerSettings
        from metaunlearn.data.generate import generate_folder

        if spec.source == "render":
            from metaunlearn.runs import refuse_foreign
            from metaunlearn.toyworld.attack_data import render_folder

            if folder.is_dir() and any(folder.iterdir()) and not (folder / "generation.json").is_file():
                refuse_foreign(folder, sorted(folder.iterdir()), f"cannot replace attack set {folder.name}")
            render_folder(spec.prompts, folder, images_per_prompt=spec.images_per_prompt, seed=spec.seed)
            return

        sampler = spec.sampler or (self.data.sampler if self.data is not None else SamplerSettings())
        generate_folder(backbone, spec.prompts, folder, images_per_prompt=spec.images_per_prompt, seed=spec.seed,
                        sampler=sampler, overwrite=self.overwrite, progress=progress)

    def _unlearn(self, config, progress: bool) -> None:
        from metaunlearn.unlearn import run_unlearn

        result = run_unlearn(config, overwrite=self.overwrite, progress=progress)
        self.console.print(f"  saved {result.model} ({result.steps} steps)")

    def _suite(self, seed: int = 0):
        """The attack suite with resolved data folders; its seeds shifted by the grid seed ``seed``."""
        suite = self.config.attack
        sets = {}
        for name, spec in suite.sets.items():
            if spec.seeds:
                spec = spec.model_copy(update={"seeds": [s + seed for s in spec.seeds]})
            if name in self.config.attack_data:
                spec = spec.model_copy(update={"data": str(self.attack_folders()[name])})
            elif spec.data:
                spec = spec.model_copy(update={"data": str(_resolve(spec.data, self.base))})
            sets[name] = spec
        cache = str(self.run.path / "cache") if suite.cache_dir is None else str(_resolve(suite.cache_dir, self.base))
        return suite.model_copy(update={"sets": sets, "cache_dir": cache, "seeds": [s + seed for s in suite.seeds]})

    def _attack(self, model: GridModel, suite, progress: bool) -> None:
        from metaunlearn.attacks.stage import attack_model

        folder = self.model_folder(model)
        if not folder.is_dir():
            raise UserError(f"model {model.key} was not built: {folder} is missing")
        attack_model(folder, suite, self.run.path, eval_config=self.config.eval, base_dir=self.base, name=model.name,
                     method=model.method, variant=model.variant, stage_key=model.key, overwrite=self.overwrite,
                     progress=progress, lock=False)  # the run's process holds the run folder's lock


def run_experiment(path: str | Path, *, run_dir: str | Path | None = None, dry_run: bool = False,
                   progress: bool = True, console: Console | None = None, jobs: int = 1, ray: str | None = None,
                   resources: StageResources | None = None, overwrite: bool = False,
                   device_memory: float | None = None, command: str | None = None) -> Path | None:
    """``metaunlearn run CONFIG``: every stage the config names, skipping finished ones.

    The run folder is ``run_dir``, else the config's ``run_dir`` (relative to the config file), else
    ``runs/<config name>`` in the working directory. A dry run validates every section, prints the plan and every
    input that does not exist yet (and what provides it), each meta stage's predicted peak memory (and whether it
    fits ``device_memory`` GiB), and creates nothing. Stages already run with other settings are refused unless
    ``overwrite``.
    """
    from metaunlearn.config import default_run_dir

    config, _, base = load_experiment(path)
    chosen = Path(run_dir) if run_dir is not None else default_run_dir(path, config.run_dir)
    experiment = Experiment(config, base, chosen, console, create=False, overwrite=overwrite)
    if dry_run:
        preflight.dry_run(experiment, path, device_memory)
        return None
    preflight.require_inputs(experiment)  # every input that no stage makes exists before anything is written
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("run schedules whole stages itself: start it as one process (--jobs N or --ray for stages at "
                        "once); torchrun / accelerate launch are for one unlearn or attack stage")
    return experiment.run_all(progress=progress, jobs=jobs, ray=ray, resources=resources, command=command)
