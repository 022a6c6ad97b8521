"""User-facing errors: the CLI prints ``error: <message>`` on one line and exits with code 2."""

from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """Bad input from the user (a path, a config, a data folder). Never a bug in metaunlearn."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)


_HINTS = {
    errno.ENOSPC: "free some space and run again",
    errno.EDQUOT: "free some space and run again",
    errno.EFBIG: "the file system refused a file this large",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.EROFS: "choose a writable output folder",
    errno.ENOTDIR: "a parent of it is a file, not a folder",
}


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system error (full disk, permissions, a path under a file, ...).

    Every output of metaunlearn is written atomically, so the line can promise that earlier outputs are intact.
    """
    what = exc.strerror or type(exc).__name__
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
    hint = _HINTS.get(exc.errno or -1)
    text = f"{what}: {where}" if where else what
    if hint:
        text += f" ({hint})"
    return f"{text}; earlier outputs are unchanged"


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def as_os_error(exc: Exception, path: object = None) -> OSError:
    """An :class:`OSError` for an I/O failure a library reports otherwise (``safetensors``' ``SafetensorError``:
    ``... I/O error: File too large (os error 27)``), so it gets the same one line as any full disk."""
    if isinstance(exc, OSError):
        return exc
    match = _OS_ERROR.search(str(exc))
    code = int(match.group(1)) if match else errno.EIO
    return OSError(code, os.strerror(code), None if path is None else str(path))


def is_io_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an I/O failure: an :class:`OSError`, or a ``SafetensorError`` while writing or reading."""
    if isinstance(exc, OSError):
        return True
    return type(exc).__name__ == "SafetensorError" and ("I/O error" in str(exc) or _OS_ERROR.search(str(exc)) is not None)
