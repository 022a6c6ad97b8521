"""Folder locks: one metaunlearn process at a time writes a run folder, an unlearn output folder or a data folder.

A lock is an ``fcntl.flock`` on ``.<folder>.lock`` beside the folder (a folder may itself be replaced by a rename);
the kernel releases it when its holder exits, however it exits (a SIGKILL included). The holder writes its pid into
the file, so a second process refuses with one line naming it — or waits for it inside :func:`waiting_for_locks`
(the commands' ``--wait``). A process holding a lock may take it again (the in-process scheduler runs its stages
under the run folder's lock); the worker processes of one ``run`` are covered by the lock of their parent, which
passes ``lock=False`` to the stages that write into the run folder itself.
"""

from __future__ import annotations

import contextvars
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from metaunlearn.atomic import ensure_dir, usual_mode
from metaunlearn.errors import UserError

_WAIT = contextvars.ContextVar("metaunlearn_wait_for_locks", default=False)
_HELD: dict[Path, int] = {}  # lock files this process holds -> how often it took each


def lock_path(folder: str | Path) -> Path:
    """The lock file of ``folder``: ``.<name>.lock`` beside it."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def waiting_for_locks(wait: bool = True) -> Iterator[None]:
    """Within the block, a folder lock that another process holds is waited for instead of refused."""
    token = _WAIT.set(wait)
    try:
        yield
    finally:
        _WAIT.reset(token)


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def folder_lock(folder: str | Path, what: str = "folder", wait: bool | None = None) -> Iterator[Path]:
    """Hold the lock of ``folder`` for the block (created beside it; the folder itself need not exist yet).

    Another process holding it: a one-line :class:`UserError` naming its pid, or, with ``wait`` (default: inside
    :func:`waiting_for_locks`), block until it is released.
    """
    path = lock_path(folder)
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield path
        finally:
            _HELD[path] -= 1
        return
    wait = _WAIT.get() if wait is None else wait
    ensure_dir(path.parent)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, usual_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{what} {Path(folder)} is in use by another metaunlearn process (pid {_holder(path)}); "
                            "wait for it to finish, or pass --wait to queue behind it") from None
        try:  # a holder that released it meanwhile removed the file: lock the one now at the path
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[path] = 1
    try:
        yield path
    finally:
        del _HELD[path]
        try:
            path.unlink()  # while still locked: a waiter that opened it sees it is gone and opens the new one
        except FileNotFoundError:
            pass
        os.close(fd)


def is_main_launch_process() -> bool:
    """Whether this is the main (or only) process of a data-parallel launch: the one that writes and locks."""
    return int(os.environ.get("RANK", "0")) == 0
