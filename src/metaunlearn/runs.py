"""Run folders and output hygiene shared by every stage.

* :func:`create_run_dir` / :func:`latest_run_dir` — numbered, named run folders (``runs/00003-toy-esd``).
* :class:`RunDir` — the resolved config (``config.json``) and per-stage done-markers, so re-running a config skips
  the stages that already finished with the same settings.
* :func:`print_plan` — the ``--dry-run`` table: stages, models, data sets and output paths.

Writing outputs atomically lives in :mod:`metaunlearn.atomic`, progress bars in :mod:`metaunlearn.progress`; their
names are also importable from here.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from metaunlearn.atomic import (  # noqa: F401  (also importable from here)
    AtomicFiles,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_text,
    ensure_dir,
    make_temp_dir,
    recover_directory,
    replace_directory,
    usual_mode,
)
from metaunlearn.errors import UserError
from metaunlearn.progress import RateColumn, progress_bar, quiet_libraries  # noqa: F401  (also importable from here)

CONFIG_FILE = "config.json"
STAGES_DIR = "stages"
_RUN_NAME = re.compile(r"^(\d{5})-(.+)$")


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
    previous: bool = False  # the record is the one a failed ``--overwrite`` kept beside its own (see RunDir.begin)

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

    def _previous(self, stage: str) -> Path:
        marker = self._marker(stage)
        return marker.with_name(marker.name[: -len(".json")] + ".previous.json")

    def record(self, stage: str, previous: bool = False) -> dict | None:
        """The marker of ``stage`` (``None`` when there is none or it is unreadable); ``previous``: the done record
        an unfinished ``--overwrite`` kept beside its own."""
        marker = self._previous(stage) if previous else self._marker(stage)
        legacy = marker.with_name(marker.name[: -len(".json")] + ".done.json")
        for path, state in ((marker, None), *(() if previous else ((legacy, "done"),))):
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
        before = self.record(stage, previous=True)
        if before is not None and before.get("settings_key") == settings_key(new) and not (
                record is not None and record.get("settings_key") == before.get("settings_key")):
            # an --overwrite that never finished: the settings it replaced are asked for again
            done = before.get("state") == "done" and all(Path(p).exists() for p in complete)
            return StageStatus("done" if done else "partial", record=before, previous=True)
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
              outputs: Sequence[Path] = (), resumable: Sequence[str] = (), complete: Sequence[Path] = (),
              owned: bool = False) -> StageStatus:
        """Check ``stage`` against ``settings`` and record it as started (unless it is done).

        Changed settings raise a one-line :class:`UserError` unless ``overwrite``; then the caller discards the
        old outputs (status ``changed``) before redoing the stage. ``overwrite`` never discards outputs that no
        record of metaunlearn's claims (no marker, and not ``owned`` by the caller's own evidence).
        """
        status = self.status(stage, settings, outputs=outputs, resumable=resumable, complete=complete)
        if status.state == "changed" and not overwrite:
            raise UserError(
                f"{what or stage} was made with other settings ({status.describe()} changed); "
                "pass --overwrite to redo it, or choose another output folder"
            )
        if status.state == "changed" and status.record is None and not owned:
            refuse_foreign(self.path, [p for p in outputs if Path(p).exists()], what or stage)
        if status.previous:  # back to the settings an unfinished --overwrite replaced: its record is the stage's
            self._previous(stage).replace(self._marker(stage))
        elif status.state == "changed" and (status.record or {}).get("state") == "done":
            # kept beside until the redone stage is done, so a failure leaves the old settings' outputs usable
            atomic_write_text(self._previous(stage), json.dumps(status.record, indent=2, default=str) + "\n")
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
        path = self._write(stage, settings, "done", **info)
        self._previous(stage).unlink(missing_ok=True)
        return path

    def clear_done(self, stage: str) -> None:
        """Forget ``stage``, so the next run repeats it."""
        marker = self._marker(stage)
        marker.unlink(missing_ok=True)
        marker.with_name(marker.name[: -len(".json")] + ".done.json").unlink(missing_ok=True)
        self._previous(stage).unlink(missing_ok=True)


def refuse_foreign(folder: Path, found: Sequence[Path], what: str) -> None:
    """Raise: ``found`` in ``folder`` were not made by metaunlearn (no record of it), so ``--overwrite`` keeps them."""
    shown = ", ".join(str(Path(p).relative_to(folder)) if Path(p).is_relative_to(folder) else str(p) for p in found[:3])
    raise UserError(f"{what}: {folder} holds files metaunlearn did not make ({shown or 'no record of its settings'}); "
                    "--overwrite replaces only metaunlearn's own outputs: move them away or choose another folder")


ASIDE_DIR = ".previous"
"""A stage folder's outputs of the settings an unfinished ``--overwrite`` replaced (see :func:`set_aside`)."""


def set_aside(folder: Path, names: Sequence[str]) -> None:
    """Move the outputs ``names`` of ``folder`` into ``folder/.previous`` before a stage is redone with other
    settings, so a failed redo can give them back (:func:`restore_aside`). When it already holds outputs (an earlier
    redo never finished), those are the ones kept, and these, of the unfinished redo, are deleted."""
    folder = Path(folder)
    aside = folder / ASIDE_DIR
    if aside.exists():
        remove_outputs([folder / n for n in names])
        return
    staged = make_temp_dir(folder, f"{ASIDE_DIR}.tmp-")
    for name in names:
        if (folder / name).exists() or (folder / name).is_symlink():
            (folder / name).rename(staged / name)
    staged.rename(aside)


def restore_aside(folder: Path, names: Sequence[str]) -> None:
    """Give back what :func:`set_aside` kept, replacing the outputs ``names`` of an unfinished redo."""
    folder = Path(folder)
    aside = folder / ASIDE_DIR
    if not aside.is_dir():
        return
    remove_outputs([folder / n for n in names])
    for name in names:
        if (aside / name).exists() or (aside / name).is_symlink():
            (aside / name).rename(folder / name)
    shutil.rmtree(aside)


def drop_aside(folder: Path) -> None:
    """Delete what :func:`set_aside` kept: the stage was redone."""
    shutil.rmtree(Path(folder) / ASIDE_DIR, ignore_errors=True)


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
