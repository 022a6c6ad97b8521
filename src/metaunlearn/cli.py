"""The ``metaunlearn`` command line: one command per stage, ``run`` for a whole config, ``demo``, ``toy``.

Every command module exposes ``register(app)``; this file only assembles them and turns a
:class:`~metaunlearn.errors.UserError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import os
import sys

import click
import typer
from rich.console import Console

from metaunlearn.errors import UserError
from metaunlearn.runs import quiet_libraries

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time warnings come before quiet_libraries runs

app = typer.Typer(
    name="metaunlearn",
    help="Make unlearned diffusion models resist relearning (Meta-Unlearning).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = [
    "metaunlearn.commands.generate",
    "metaunlearn.commands.unlearn",
    "metaunlearn.commands.attack",
    "metaunlearn.commands.report",
    "metaunlearn.commands.run",
    "metaunlearn.commands.demo",
    "metaunlearn.commands.toy",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


try:  # typer >= 0.2x raises the usage errors of its own vendored click copy, not click's
    from typer._click.exceptions import ClickException as _TyperClickException

    _CLICK_ERRORS: tuple[type[Exception], ...] = (click.ClickException, _TyperClickException)
except ImportError:
    _CLICK_ERRORS = (click.ClickException,)


def main() -> None:
    """Console-script entry point."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    quiet_libraries()
    try:
        app(standalone_mode=False)
    except UserError as exc:
        err.print(f"error: {exc}", markup=False)
        sys.exit(2)
    except (click.exceptions.Exit, typer.Exit) as exc:
        sys.exit(exc.exit_code)
    except _CLICK_ERRORS as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
