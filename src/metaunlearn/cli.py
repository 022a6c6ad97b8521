"""The ``metaunlearn`` command line: one command per stage, ``run`` for a whole config, ``demo``, ``toy``.

Every command module exposes ``register(app)``; this file only assembles them and turns a
:class:`~metaunlearn.errors.UserError` into one line on stderr and exit code 2.

Building the app imports nothing heavy (no torch, diffusers, transformers, matplotlib): command modules import
those inside their bodies, so ``--help`` and ``--version`` answer at once. ``tests/test_cli.py`` checks it;
``benchmarks/cli_startup.py`` measures it.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

import typer

from metaunlearn import __version__
from metaunlearn.errors import UserError, as_os_error, is_io_error, os_error_message

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time warnings come before quiet_libraries runs
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

app = typer.Typer(
    name="metaunlearn",
    help="Make unlearned diffusion models resist relearning (Meta-Unlearning).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"metaunlearn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Make unlearned diffusion models resist relearning (Meta-Unlearning)."""


COMMAND_MODULES = [
    "metaunlearn.commands.generate",
    "metaunlearn.commands.unlearn",
    "metaunlearn.commands.attack",
    "metaunlearn.commands.report",
    "metaunlearn.commands.run",
    "metaunlearn.commands.demo",
    "metaunlearn.commands.toy",
    "metaunlearn.commands.config",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


try:  # typer >= 0.2x raises the usage errors of its own vendored click copy, and needs no click package
    from typer._click.exceptions import ClickException as _ClickException
except ImportError:  # older typer is built on click
    from click import ClickException as _ClickException


def _quiet_first(callback):
    """Run ``callback`` (a command body) after quieting diffusers/transformers, which it is about to import."""

    @functools.wraps(callback)
    def run(*args, **kwargs):
        from metaunlearn.progress import quiet_libraries

        quiet_libraries()
        return callback(*args, **kwargs)

    return run


def build_command():
    """The click command of :data:`app`; every command body quiets the libraries before it runs (never ``--help``)."""
    command = typer.main.get_command(app)
    pending = [command]
    while pending:
        group = pending.pop()
        for sub in getattr(group, "commands", {}).values():
            if not sub.short_help and sub.help:  # the whole first paragraph in command lists, wrapped, not cut at 45
                sub.short_help = " ".join(sub.help.strip().split("\n\n")[0].split())
            if getattr(sub, "commands", None):
                pending.append(sub)
            elif sub.callback is not None:
                sub.callback = _quiet_first(sub.callback)
    return command


def main() -> None:
    """Console-script entry point."""
    from rich.console import Console

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        code = build_command().main(prog_name="metaunlearn", standalone_mode=False)
    except UserError as exc:
        err.print(f"error: {exc}", markup=False)
        sys.exit(2)
    except OSError as exc:  # full disk, permissions, an output path under a file: the user's to fix, not a bug
        err.print(f"error: {os_error_message(exc)}", markup=False)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except _ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except Exception as exc:  # an I/O failure a library reports as its own error (safetensors' SafetensorError)
        if not is_io_error(exc):
            raise
        err.print(f"error: {os_error_message(as_os_error(exc))}", markup=False)
        sys.exit(2)
    if code == 130:  # typer turns Ctrl-C into this exit code
        err.print("interrupted")
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
