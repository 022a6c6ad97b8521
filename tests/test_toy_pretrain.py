"""``metaunlearn toy pretrain``: its defaults are the shipped assets' recipe, it writes to ``toy_assets/`` in the
working directory unless told, and it never replaces the shipped assets (or any folder in them) unless told."""

from __future__ import annotations

import functools
import json
import shlex
from pathlib import Path

import pytest

import metaunlearn

SHIPPED = Path(metaunlearn.__file__).resolve().parent / "assets" / "toy"


def _defaults() -> dict[str, object]:
    import typer.main

    from metaunlearn.toyworld.cli import app

    command = typer.main.get_command(app).commands["pretrain"]
    return {p.name: p.default for p in command.params}


def test_the_defaults_are_the_shipped_recipe():
    """eval.json records the command that built the shipped assets; run without options, pretrain is that command
    (the thread count too: the trained weights depend on it)."""
    recorded = shlex.split(json.loads((SHIPPED / "eval.json").read_text())["command"])
    assert recorded[:3] == ["metaunlearn", "toy", "pretrain"]
    options = dict(zip(recorded[3::2], recorded[4::2]))
    defaults = _defaults()
    assert set(options) == {"--seed", "--steps", "--detector-steps", "--threads"}
    for option, value in options.items():
        assert str(defaults[option[2:].replace("-", "_")]) == value, option
    assert Path(defaults["out"]) == Path("toy_assets") and not defaults["overwrite_shipped"]


def _no_training(monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("trained")

    from metaunlearn.toyworld import detector

    monkeypatch.setattr(detector, "train_detector", never)


@pytest.mark.parametrize("where", [".", "model", "retrain_red_triangle", "new/deeper", ".."])
def test_pretrain_refuses_the_shipped_assets_before_any_work(where, run_cli, monkeypatch):
    _no_training(monkeypatch)
    before = sorted(p.name for p in SHIPPED.iterdir())
    result = run_cli("toy", "pretrain", "--out", SHIPPED / where, "--steps", "1")
    assert result.exit_code == 2, result.stderr
    assert "shipped toy assets" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in SHIPPED.iterdir()) == before


def test_pretrain_refuses_a_folder_of_other_files(run_cli, tmp_path, monkeypatch):
    _no_training(monkeypatch)
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli("toy", "pretrain", "--out", tmp_path, "--steps", "1")
    assert result.exit_code == 2 and "holds other files" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_pretrain_writes_toy_assets_in_the_working_directory(run_cli, tmp_path, monkeypatch):
    """Tiny sizes (few images, 2 training and sampling steps); the shipped folder is untouched.
    --overwrite-shipped lets it write into the (here stand-in) shipped folder."""
    from metaunlearn.toyworld import cli, detector, pretrain

    monkeypatch.setattr(pretrain, "ToyModelConfig",
                        functools.partial(pretrain.ToyModelConfig, images_per_concept=4, batch_size=4))
    monkeypatch.setattr(detector, "train_detector", functools.partial(detector.train_detector, per_class=4))
    monkeypatch.setattr(pretrain, "evaluate_model", functools.partial(pretrain.evaluate_model, steps=2))
    monkeypatch.setattr(pretrain, "sample_grid", functools.partial(pretrain.sample_grid, n=1))
    monkeypatch.chdir(tmp_path)
    stamp = (SHIPPED / "eval.json").stat().st_mtime_ns
    result = run_cli("toy", "pretrain", "--steps", "2", "--detector-steps", "2", "--eval-samples", "1")
    assert result.exit_code == 0, result.stderr
    written = json.loads((tmp_path / "toy_assets" / "eval.json").read_text())
    assert written["command"].endswith("--steps 2 --detector-steps 2 --threads 1") and written["torch_threads"] == 1
    assert (tmp_path / "toy_assets" / "model" / "model_index.json").is_file()
    assert (SHIPPED / "eval.json").stat().st_mtime_ns == stamp
    stand_in = tmp_path / "package" / "assets" / "toy"
    (stand_in / "model").mkdir(parents=True)
    monkeypatch.setattr(cli, "ASSET_DIR", stand_in)
    args = ("toy", "pretrain", "--out", stand_in / "retrain_red_triangle", "--steps", "2", "--detector-steps", "2",
            "--eval-samples", "1", "--exclude", "red_triangle")
    assert run_cli(*args).exit_code == 2
    assert run_cli(*args, "--overwrite-shipped").exit_code == 0
    reference = json.loads((stand_in / "retrain_red_triangle" / "eval.json").read_text())
    assert "--exclude red_triangle" in reference["command"]
