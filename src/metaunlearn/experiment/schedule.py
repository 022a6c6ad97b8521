"""One scheduler for an experiment's stage graph (its unlearn and attack stages), with a local and a Ray backend.

The graph is :meth:`Experiment.tasks`: every :class:`~metaunlearn.experiment.runner.Task` names the stages it waits
for (an attack its model, a from-plain meta model its plain twin). :func:`run_graph` skips the tasks whose stage
marker says finished with the same settings, submits a task as soon as everything it waits for is done, and retries
a failed task once (not a bad-input error, which would fail the same way), then stops with the task's log. The
backends only run tasks:

* :class:`InProcess` — one task after another in this process, with its progress bars (``--jobs 1``);
* :class:`ProcessPool` — ``jobs`` spawned worker processes on this machine, ``cpu_count // jobs`` torch threads each
  (``--jobs N``);
* :class:`RayBackend` — every task a Ray task that requests the CPUs and GPUs a stage needs
  (:class:`StageResources`), on a new local Ray instance or an existing cluster (``--ray [ADDRESS]``). Every node
  must see the run directory, the model and the data at the same paths (shared storage) and have this package
  installed. Ray is an optional dependency: ``pip install metaunlearn[ray]``.

A task run by a worker writes everything it prints to ``RUN_DIR/logs/<stage>.log`` (both attempts, and the
traceback of a failure). Each task writes its own outputs and stage marker, so a finished stage is never redone and an
interrupted grid resumes where it stopped, whatever the backend.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console

from metaunlearn.errors import UserError

if TYPE_CHECKING:
    from metaunlearn.experiment.runner import Experiment, Task

LOG_DIR = "logs"
ATTEMPTS = 2
"""A failing task runs at most this often (one retry)."""


@dataclass(frozen=True)
class StageResources:
    """What one stage asks a Ray cluster for: CPU cores (also its torch threads) and GPUs (None: 1 when the
    cluster has GPUs, else 0)."""

    cpus: int = 1
    gpus: float | None = None


def log_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / LOG_DIR / f"{stage}.log"


# ---- what a worker runs -----------------------------------------------------------------------------------------
@contextmanager
def _output_to(path: Path):
    """Send this process's stdout and stderr (file descriptors too: library warnings, tqdm) to ``path``."""
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield log
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_task_in_worker(experiment_cls: type[Experiment], config, base: Path, run_dir: Path, task: Task, threads: int,
                       attempt: int) -> str:
    """One unlearn or attack stage in a worker process (pool or Ray), output to its log; returns the stage.

    ``experiment_cls`` is the submitting experiment's class, which the worker rebuilds from the config."""
    import torch

    from metaunlearn.progress import quiet_libraries

    torch.set_num_threads(threads)
    quiet_libraries()
    with _output_to(log_path(run_dir, task.stage)):
        print(f"== {task.stage}, attempt {attempt} of {ATTEMPTS}, {time.strftime('%Y-%m-%d %H:%M:%S')}, "
              f"host {os.uname().nodename}, {threads} thread(s)", flush=True)
        try:
            experiment = experiment_cls(config, base, run_dir, Console(file=None, stderr=True, force_terminal=False))
            experiment.run_task(task, progress=False)
        except BaseException:
            traceback.print_exc()
            raise
    return task.stage


# ---- backends ---------------------------------------------------------------------------------------------------
class Backend(Protocol):
    capacity: int
    """Tasks that may run at once."""
    shows_progress: bool
    """Tasks draw their own progress bars (then the scheduler draws none)."""

    def submit(self, task: Task, attempt: int) -> Any: ...

    def wait(self, handles: Sequence[Any]) -> list[tuple[Any, BaseException | None]]:
        """Block until at least one handle finished; return the finished ones with their error (or None)."""

    def close(self, cancel: bool) -> None: ...


class InProcess:
    """One task after another in this process (progress bars shown)."""

    capacity = 1
    shows_progress = True

    def __init__(self, experiment: Experiment, progress: bool) -> None:
        self.experiment, self.progress = experiment, progress
        self._outcomes: dict[int, BaseException | None] = {}

    def submit(self, task: Task, attempt: int) -> int:
        handle = len(self._outcomes)
        try:
            self.experiment.run_task(task, self.progress)
            self._outcomes[handle] = None
        except Exception as exc:  # noqa: BLE001  the scheduler decides (retry, or report)
            if not isinstance(exc, UserError):
                self.experiment.console.print(f"{task.stage} failed:\n{traceback.format_exc()}", markup=False,
                                              highlight=False)
            self._outcomes[handle] = exc
        return handle

    def wait(self, handles):
        return [(h, self._outcomes.pop(h)) for h in handles]

    def close(self, cancel: bool) -> None:
        pass


class ProcessPool:
    """``jobs`` spawned worker processes on this machine."""

    shows_progress = False

    def __init__(self, experiment: Experiment, jobs: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.experiment = experiment
        self.capacity = jobs
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))

    def describe(self) -> str:
        return f"{self.capacity} processes ({self.threads} torch thread(s) each)"

    def submit(self, task: Task, attempt: int):
        e = self.experiment
        return self.pool.submit(run_task_in_worker, type(e), e.config, e.base, e.run.path, task, self.threads, attempt)

    def wait(self, handles):
        from concurrent.futures import FIRST_COMPLETED, wait

        finished, _ = wait(handles, return_when=FIRST_COMPLETED)
        return [(f, f.exception()) for f in finished]

    def close(self, cancel: bool) -> None:
        self.pool.shutdown(wait=True, cancel_futures=cancel)


class RayBackend:
    """Ray tasks on a new local instance (``address`` None; ``num_cpus`` caps it) or an existing cluster."""

    shows_progress = False

    def __init__(self, experiment: Experiment, address: str | None, resources: StageResources,
                 num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise UserError("--ray needs Ray: pip install 'metaunlearn[ray]'") from None
        self.ray = ray
        self.experiment = experiment
        self.started = not ray.is_initialized()
        if self.started:
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            try:
                if address is None:
                    ray.init(num_cpus=num_cpus, **kwargs)
                else:
                    ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserError(f"cannot reach the Ray cluster at {address or 'a new local instance'}: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        gpus = resources.gpus
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.resources = StageResources(resources.cpus, gpus)
        self.remote = ray.remote(num_cpus=resources.cpus, num_gpus=gpus, max_retries=0)(run_task_in_worker)
        self.capacity = 1 << 30  # Ray queues tasks until a node has the resources

    def describe(self) -> str:
        total = self.ray.cluster_resources()
        return (f"Ray tasks of {self.resources.cpus} CPU / {self.resources.gpus:g} GPU each on "
                f"{int(total.get('CPU', 0))} CPUs, {int(total.get('GPU', 0))} GPUs")

    def submit(self, task: Task, attempt: int):
        e = self.experiment
        return self.remote.remote(type(e), e.config, e.base, e.run.path, task, self.resources.cpus, attempt)

    def wait(self, handles):
        ready, _ = self.ray.wait(list(handles), num_returns=1)
        out = []
        for ref in ready:
            try:
                self.ray.get(ref)
                out.append((ref, None))
            except self.ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                out.append((ref, cause))
            except self.ray.exceptions.RayError as exc:  # the worker or its node died
                out.append((ref, exc))
        return out

    def close(self, cancel: bool) -> None:
        if self.started:
            self.ray.shutdown()


# ---- the scheduler ----------------------------------------------------------------------------------------------
def run_graph(
    experiment: Experiment,
    tasks: Sequence[Task],
    make_backend: Callable[[], Backend],
    *,
    progress: bool = True,
    on_done: Callable[[Task], None] | None = None,
) -> None:
    """Run ``tasks`` in dependency order on the backend ``make_backend()`` builds (only when a task is left to
    run; see the module docstring)."""
    from metaunlearn.progress import progress_bar

    console = experiment.console
    done = {t.stage for t in tasks if experiment.is_done(t)}
    pending = [t for t in tasks if t.stage not in done]
    known = {t.stage for t in tasks}
    missing = {a for t in pending for a in t.after if a not in known}
    if missing:
        raise UserError(f"stages {sorted(missing)} are needed but not part of this run")
    for t in tasks:
        if t.stage in done:
            console.print(f"[dim]skip {t.stage} (done)[/]")
    if not pending:
        return
    backend = make_backend()
    if hasattr(backend, "describe"):
        console.print(f"{len(pending)} stages as {backend.describe()}; {len(done)} already done")
    attempts: dict[str, int] = {}
    running: dict[Any, tuple[Task, float]] = {}
    bar_on = progress and not backend.shows_progress
    failed = True
    try:
        with progress_bar("stage", enabled=bar_on, console=console) as bar:
            overall = bar.add_task("stages", total=len(pending), info="")
            while pending or running:
                ready = [t for t in pending if all(a in done for a in t.after)]
                for task in ready[: max(0, backend.capacity - len(running))]:
                    pending.remove(task)
                    attempts[task.stage] = attempts.get(task.stage, 0) + 1
                    if not backend.shows_progress:
                        console.print(f"[bold cyan]start[/] {task.stage}"
                                      + (f" (attempt {attempts[task.stage]})" if attempts[task.stage] > 1 else ""))
                    running[backend.submit(task, attempts[task.stage])] = (task, time.time())
                if not running:
                    raise UserError(f"stages {[t.stage for t in pending]} wait for stages that never finish")
                bar.update(overall, info=", ".join(t.stage for t, _ in running.values()))
                for handle, error in backend.wait(list(running)):
                    task, started = running.pop(handle)
                    if error is None:
                        done.add(task.stage)
                        console.print(f"[bold cyan]done[/] {task.stage} ({time.time() - started:.0f} s)")
                        bar.update(overall, advance=1)
                        if on_done is not None:
                            on_done(task)
                    elif isinstance(error, UserError):
                        raise error
                    elif attempts[task.stage] < ATTEMPTS:
                        console.print(f"[yellow]retry[/] {task.stage}: {_summary(error)}")
                        pending.insert(0, task)
                    else:
                        raise UserError(_failure(experiment, task, error, backend))
        failed = False
    finally:
        backend.close(cancel=failed)


def _summary(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".rstrip(": ")


def _failure(experiment: Experiment, task: Task, error: BaseException, backend) -> str:
    """One line: the stage, the error, and where its log is (its last lines printed first)."""
    if isinstance(backend, InProcess):
        return f"stage {task.stage} failed twice: {_summary(error)}"
    path = log_path(experiment.run.path, task.stage)
    if path.is_file():
        tail = path.read_text(errors="replace").splitlines()[-20:]
        experiment.console.print(f"[red]last lines of {path}:[/]")
        experiment.console.print("\n".join(tail), markup=False, highlight=False)
    return f"stage {task.stage} failed twice: {_summary(error)}; log: {path}"
