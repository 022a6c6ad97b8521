"""User-facing errors: the CLI prints ``error: <message>`` on one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a path, a config, a data folder). Never a bug in metaunlearn."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)
