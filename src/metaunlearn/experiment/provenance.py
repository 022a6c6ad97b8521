"""Where a run's results came from: each invocation's command, source commit and date, for pages that quote them.

``RUN_DIR/provenance.json`` holds one entry per ``run``/``demo`` invocation on the folder (a resumed run adds one),
so a page written from the run names every commit whose code produced part of it.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from metaunlearn.atomic import atomic_write_text

FILE = "provenance.json"


def source_commit() -> tuple[str | None, bool]:
    """``(commit, dirty)`` of the git checkout holding this package's source; ``(None, False)`` when not in one."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, False
    return commit, bool(git("status", "--porcelain", "--untracked-files=no", "--", str(here.parent)))


def record(run_dir: str | Path, command: str | None) -> dict:
    """Add this invocation (command, commit, dirty, version, UTC date) to ``run_dir``'s provenance."""
    from metaunlearn import __version__

    commit, dirty = source_commit()
    entry = {"command": command or "python API", "commit": commit, "dirty": dirty, "version": __version__,
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    entries = read(run_dir)
    atomic_write_text(Path(run_dir) / FILE, json.dumps([*entries, entry], indent=1) + "\n")
    return entry


def read(run_dir: str | Path) -> list[dict]:
    """The recorded invocations, oldest first (empty for a run folder made before provenance was kept)."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def describe(entries: list[dict]) -> str:
    """One sentence for a results page: when, at which commit and by which command the results were made."""
    if not entries:
        return "Provenance unknown (the run folder predates provenance records)."

    def one(e: dict) -> str:
        commit = (e.get("commit") or "an unknown commit")[:10] + (" with uncommitted changes" if e.get("dirty") else "")
        return f"`{e.get('command')}` on {e.get('date')} at commit {commit}"

    if len(entries) == 1:
        return f"Made by {one(entries[0])}."
    return "Made over several invocations: " + "; ".join(one(e) for e in entries) + "."
