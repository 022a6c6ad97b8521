"""Run folders and output hygiene shared by every stage.

* :func:`create_run_dir` / :func:`latest_run_dir` — numbered, named run folders (``runs/00003-toy-esd``).
* :class:`RunDir` — the resolved config (``config.json``) and per-stage done-markers, so re-running a config skips
  the stages that already finished with the same settings.
* :func:`print_plan` — the ``--dry-run`` table: stages, models, data sets and output paths.
* :func:`atomic_directory` / :func:`replace_directory` / :func:`atomic_write_text` — outputs appear complete or not
  at all; a good existing output is never replaced by a half-written one.
* :func:`progress_bar` — the one rich progress display (count, rate, elapsed, ETA) long work uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from metaunlearn.errors import UserError

CONFIG_FILE = "config.json"
STAGES_DIR = "stages"
_RUN_NAME = re.compile(r"^(\d{5})-(.+)$")


# ---- writing outputs safely -----------------------------------------------------------------------------------
def ensure_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) or raise a one-line :class:`UserError` saying why it cannot be created."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"cannot create folder {path}: a file with that name exists") from None
    except NotADirectoryError:
        raise UserError(f"cannot create folder {path}: a parent of it is a file, not a folder") from None
    except OSError as exc:
        raise UserError(f"cannot create folder {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to folder {path}")
    return path


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A fresh folder in ``parent`` with the usual permissions (``mkdtemp`` makes it private to the owner, which
    would leak into the finished output once it is renamed into place)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o777 & ~_umask())
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_directory(new: Path, final: Path) -> None:
    """Move the finished folder ``new`` to ``final``, replacing an existing ``final``.

    The old folder is first renamed aside (``.<name>.old``) and deleted only after ``new`` is in place; if the
    process dies in between, :func:`recover_directory` finds the old folder again.
    """
    new, final = Path(new), Path(final)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover_directory(final: Path) -> Path:
    """``final``, restored from ``.<name>.old`` when a :func:`replace_directory` was interrupted mid-swap."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.is_dir():
        old.rename(final)
    return final


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on success it replaces ``final``, on error it is removed.

    ``with atomic_directory(out) as tmp: write files into tmp`` — readers see the old folder or the complete new
    one, never a partial one.
    """
    final = Path(final)
    ensure_dir(final.parent)
    tmp = make_temp_dir(final.parent, f".{final.name}.tmp-")
    try:
        yield tmp
        replace_directory(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a UTF-8 text file through a temporary file and a rename (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def usual_mode(directory: bool = False) -> int:
    """The permissions a new file (or folder) gets under the current umask, e.g. ``0o644`` under umask 022."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write a binary file (e.g. a PNG) through a temporary file and a rename, with the usual permissions."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class AtomicFiles:
    """Several outputs that appear together or not at all (a report: JSON, CSV, Markdown, HTML, figures).

    Each file or folder is first written to a temporary name beside its final path (:meth:`temp_file`,
    :meth:`temp_dir`, :meth:`write_text`); :meth:`commit` renames them all into place. Renames need no space, so a
    full disk or any other error while writing leaves every previous output as it was. Use as a context manager:
    the block's success commits, an error discards.
    """

    def __init__(self) -> None:
        self._files: list[tuple[Path, Path]] = []
        self._dirs: list[tuple[Path, Path]] = []

    def temp_file(self, final: str | Path) -> Path:
        final = Path(final)
        ensure_dir(final.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=final.suffix, dir=final.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        self._files.append((Path(tmp), final))
        return Path(tmp)

    def temp_dir(self, final: str | Path) -> Path:
        final = Path(final)
        ensure_dir(final.parent)
        tmp = make_temp_dir(final.parent, f".{final.name}.tmp-")
        self._dirs.append((tmp, final))
        return tmp

    def write_text(self, final: str | Path, text: str) -> Path:
        """Stage ``text`` for ``final``; returns ``final`` (where it will be after :meth:`commit`)."""
        self.temp_file(final).write_text(text)
        return Path(final)

    def commit(self) -> None:
        for tmp, final in self._dirs:
            replace_directory(tmp, final)
        for tmp, final in self._files:
            os.replace(tmp, final)
        self._files, self._dirs = [], []

    def discard(self) -> None:
        for tmp, _ in self._files:
            Path(tmp).unlink(missing_ok=True)
        for tmp, _ in self._dirs:
            shutil.rmtree(tmp, ignore_errors=True)
        self._files, self._dirs = [], []

    def __enter__(self) -> AtomicFiles:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()


# ---- progress ---------------------------------------------------------------------------------------------------
class RateColumn(ProgressColumn):
    """Items (images, steps) per second, or seconds per item when slower than one per second."""

    def __init__(self, unit: str = "it") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed and task.elapsed and task.completed:
            speed = task.completed / task.elapsed
        if not speed:
            return Text(f"? {self.unit}/s", style="progress.data.speed")
        if speed >= 1:
            return Text(f"{speed:.2f} {self.unit}/s", style="progress.data.speed")
        return Text(f"{1 / speed:.2f} s/{self.unit}", style="progress.data.speed")


def quiet_libraries() -> None:
    """diffusers and transformers: errors only and no loading/saving bars (the toolkit shows its own progress)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def progress_bar(unit: str = "it", *, enabled: bool = True, console: Console | None = None) -> Progress:
    """A rich progress display with count, rate, elapsed time, ETA and a free ``info`` field (e.g. loss terms)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
        console=console or Console(stderr=True),
    )


# ---- run folders ---------------------------------------------------------------------------------------------------
def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not slug:
        raise UserError(f"run name {name!r} has no usable characters (use letters, digits, '-', '_' or '.')")
    return slug


def create_run_dir(root: str | Path, name: str) -> Path:
    """A new numbered run folder ``root/NNNNN-name`` (one more than the highest number already there)."""
    root = ensure_dir(root)
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := _RUN_NAME.match(p.name)) and p.is_dir()]
    number = max(numbers, default=-1) + 1
    while True:
        path = root / f"{number:05d}-{_slug(name)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another process took this number
            number += 1


def latest_run_dir(root: str | Path, name: str) -> Path | None:
    """The highest-numbered ``root/NNNNN-name`` folder, or ``None``."""
    root = Path(root)
    if not root.is_dir():
        return None
    slug = _slug(name)
    runs = [(int(m.group(1)), p) for p in root.iterdir() if (m := _RUN_NAME.match(p.name)) and m.group(2) == slug]
    return max(runs)[1] if runs else None


def _jsonable(settings: BaseModel | dict | str) -> dict | str:
    if isinstance(settings, BaseModel):
        return settings.model_dump(mode="json")
    if isinstance(settings, str):
        return settings
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def settings_key(settings: BaseModel | dict | str) -> str:
    """A short stable hash of a stage's settings (a pydantic model, a JSON-able dict or a string)."""
    settings = _jsonable(settings)
    text = settings if isinstance(settings, str) else json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_keys(old: object, new: object, prefix: str = "") -> list[str]:
    """Dotted paths at which two JSON documents differ (``unlearn.steps``, ``attack.sets.hrm-m.data``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += changed_keys(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out += changed_keys(a, b, f"{prefix}.{i}" if prefix else str(i))
        return out
    return [] if old == new else [prefix or "(settings)"]


@dataclass
class StageStatus:
    """Where a stage stands against the settings it is asked to run with.

    ``new``: nothing there yet. ``done``: finished with exactly these settings (skip it). ``partial``: started or
    finished with settings it can resume from (the same, or differing only in keys the stage declared resumable,
    e.g. more training steps). ``changed``: its outputs were made with other settings (``changed`` names them).
    """

    state: str
    changed: list[str] = field(default_factory=list)
    record: dict | None = None

    def describe(self) -> str:
        shown = ", ".join(self.changed[:3]) + (f" and {len(self.changed) - 3} more" if len(self.changed) > 3 else "")
        return shown or "settings"


class RunDir:
    """One output folder of a stage (or a whole run): ``stages/<stage>.json`` markers and stage subfolders.

    Every stage of metaunlearn (``run`` and ``demo`` stages, ``unlearn``, ``attack``) goes through the same three
    calls: :meth:`begin` (refuses when earlier outputs were made with other settings, unless ``overwrite``;
    records the settings as started), the work, :meth:`mark_done`. A marker holds the settings themselves, so a
    refusal can say which keys changed.
    """

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = ensure_dir(path) if create else Path(path)

    def write_config(self, config: BaseModel) -> Path:
        """Save the fully resolved config as ``config.json`` (atomically)."""
        return atomic_write_text(self.path / CONFIG_FILE, json.dumps(config.model_dump(mode="json"), indent=2) + "\n")

    def stage_dir(self, stage: str) -> Path:
        """The output folder of ``stage`` (created)."""
        return ensure_dir(self.path / _slug(stage))

    def _marker(self, stage: str) -> Path:
        parts = [_slug(p) for p in stage.split("/")]
        return self.path.joinpath(STAGES_DIR, *parts[:-1], f"{parts[-1]}.json")

    def record(self, stage: str) -> dict | None:
        """The marker of ``stage`` (``None`` when there is none or it is unreadable)."""
        marker = self._marker(stage)
        legacy = marker.with_name(marker.name[: -len(".json")] + ".done.json")
        for path, state in ((marker, None), (legacy, "done")):
            if path.is_file():
                try:
                    record = json.loads(path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                    return None
                if isinstance(record, dict):
                    return {**record, "state": state or record.get("state", "done")}
        return None

    def status(self, stage: str, settings: BaseModel | dict | str, *, outputs: Sequence[Path] = (),
               resumable: Sequence[str] = (), complete: Sequence[Path] = ()) -> StageStatus:
        """Compare ``settings`` with what ``stage`` was run with (``resumable``: top-level keys that may differ
        for a resume). Outputs present without any marker count as made with unknown settings; a stage done with
        these settings whose ``complete`` outputs are not all there (deleted since) is ``partial``: resumed."""
        record = self.record(stage)
        new = _jsonable(settings)
        if record is None:
            if any(Path(p).exists() for p in outputs):
                return StageStatus("changed", ["(no record of the settings its outputs were made with)"])
            return StageStatus("new")
        if record.get("state") == "done" and record.get("settings_key") == settings_key(new):
            if all(Path(p).exists() for p in complete):
                return StageStatus("done", record=record)
            return StageStatus("partial", record=record)
        old = record.get("settings")
        if old is None:
            return StageStatus("changed", ["(settings of an earlier version)"], record)
        differ = changed_keys(old, new)
        if differ and all(key.split(".")[0] in resumable for key in differ):
            return StageStatus("partial", differ, record)
        if not differ:
            return StageStatus("partial", record=record)
        return StageStatus("changed", differ, record)

    def begin(self, stage: str, settings: BaseModel | dict | str, *, overwrite: bool = False, what: str = "",
              outputs: Sequence[Path] = (), resumable: Sequence[str] = (), complete: Sequence[Path] = ()) -> StageStatus:
        """Check ``stage`` against ``settings`` and record it as started (unless it is done).

        Changed settings raise a one-line :class:`UserError` unless ``overwrite``; then the caller discards the
        old outputs (status ``changed``) before redoing the stage.
        """
        status = self.status(stage, settings, outputs=outputs, resumable=resumable, complete=complete)
        if status.state == "changed" and not overwrite:
            raise UserError(
                f"{what or stage} was made with other settings ({status.describe()} changed); "
                "pass --overwrite to redo it, or choose another output folder"
            )
        if status.state != "done":
            self._write(stage, settings, "started")
        return status

    def _write(self, stage: str, settings, state: str, **info: object) -> Path:
        settings = _jsonable(settings)
        record = {"stage": stage, "state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "settings_key": settings_key(settings), **info, "settings": settings}
        return atomic_write_text(self._marker(stage), json.dumps(record, indent=2, default=str) + "\n")

    def is_done(self, stage: str, settings: BaseModel | dict | str | None = None) -> bool:
        """Whether ``stage`` finished before — with the same ``settings`` when given."""
        record = self.record(stage)
        if record is None or record.get("state") != "done":
            return False
        return settings is None or record.get("settings_key") == settings_key(settings)

    def mark_done(self, stage: str, settings: BaseModel | dict | str, **info: object) -> Path:
        """Record that ``stage`` finished with ``settings``; ``info`` (JSON-able) is stored alongside."""
        return self._write(stage, settings, "done", **info)

    def clear_done(self, stage: str) -> None:
        """Forget ``stage``, so the next run repeats it."""
        marker = self._marker(stage)
        marker.unlink(missing_ok=True)
        marker.with_name(marker.name[: -len(".json")] + ".done.json").unlink(missing_ok=True)


def remove_outputs(paths: Sequence[Path]) -> None:
    """Delete stale outputs (files or folders) of a stage that is redone with other settings."""
    for path in paths:
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# ---- dry-run plans -----------------------------------------------------------------------------------------------
@dataclass
class PlannedStage:
    """One line of a dry-run plan."""

    stage: str
    model: str = ""
    data: Sequence[str] = field(default_factory=tuple)
    outputs: Sequence[str] = field(default_factory=tuple)
    done: bool = False
    note: str = ""


def print_plan(stages: Sequence[PlannedStage], console: Console | None = None, title: str = "plan") -> None:
    """Print what a run would do, stage by stage, without doing it."""
    console = console or Console()
    table = Table(title=title, show_lines=True)
    for column in ("#", "stage", "model", "data", "outputs", "status"):
        table.add_column(column, overflow="fold")
    for i, s in enumerate(stages, 1):
        status = "done (skip)" if s.done else "to run"
        if s.note:
            status += f"\n{s.note}"
        table.add_row(str(i), s.stage, s.model, "\n".join(s.data), "\n".join(s.outputs), status)
    console.print(table)
