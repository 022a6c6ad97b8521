"""``metaunlearn config init NAME [DEST]``: a copy of a packaged config to edit (its shipped assets are named
``toy://…``, so the copy works wherever it is written)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

config_app = typer.Typer(help="Packaged configs as templates.", no_args_is_help=True)


@config_app.command("init")
def init(
    name: str = typer.Argument(..., help="Packaged config: toy_demo or toy_robust."),
    dest: Optional[Path] = typer.Argument(None, help="File or folder to write (default: NAME.yaml here)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
) -> None:
    """Write a copy of a packaged config to edit; run it with 'metaunlearn run DEST'."""
    from metaunlearn.experiment.demo import init_config

    path = init_config(name, dest, overwrite)
    typer.echo(f"wrote {path}  (edit it, then: metaunlearn run {path})")


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config", help="Packaged configs as templates: config init NAME [DEST].")
