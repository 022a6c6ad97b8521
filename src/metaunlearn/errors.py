"""User-facing errors: the CLI prints ``error: <message>`` on one line and exits with code 2."""

from __future__ import annotations

import errno


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
