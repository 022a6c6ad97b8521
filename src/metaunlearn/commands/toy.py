"""``metaunlearn toy ...``: the embedded concept world (pretrain the shipped model and detector, evaluate, render)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from metaunlearn.toyworld.cli import app as toy_app

    app.add_typer(toy_app, name="toy", help="The embedded concept world: pretrain, evaluate, render.")
