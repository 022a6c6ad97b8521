"""Outputs that appear complete or not at all: a good existing output is never replaced by a half-written one.

* :func:`atomic_directory` / :func:`replace_directory` / :func:`recover_directory` — a folder written beside its
  final path and renamed into place (the old one moved aside first, recovered if the swap was interrupted).
* :func:`atomic_write_text` / :func:`atomic_write_bytes` — one file through a temporary file and a rename.
* :class:`AtomicFiles` — several outputs that appear together (a report's files).
* :func:`ensure_dir` — a folder created or one line saying why not; files get the usual permissions under the umask
  (:func:`apply_usual_modes` for a folder written by a library).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from metaunlearn.errors import UserError


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
    apply_usual_modes(new)
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


def apply_usual_modes(folder: str | Path) -> None:
    """Give every file and folder below ``folder`` (and itself) the usual permissions under the umask: libraries
    such as safetensors write their files private to the owner whatever the umask."""
    folder = Path(folder)
    files, dirs = usual_mode(), usual_mode(directory=True)
    folder.chmod(dirs)
    for root, names, leaves in os.walk(folder):
        for name in names:
            Path(root, name).chmod(dirs)
        for name in leaves:
            path = Path(root, name)
            if not path.is_symlink():
                path.chmod(files)


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
