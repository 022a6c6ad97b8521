"""The packaged configs are templates: a copy edited anywhere still finds the shipped assets (``toy://``), and no
command puts a run folder or its data inside the installed package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import metaunlearn

PACKAGE = Path(metaunlearn.__file__).resolve().parent
CONFIGS = sorted((PACKAGE / "configs").glob("*.yaml"))


def _no_memory_plan(monkeypatch) -> None:
    """The dry runs here check paths; the meta step's memory plan (seconds per stage) is tested elsewhere."""
    import importlib

    from metaunlearn.experiment import preflight

    monkeypatch.setattr(preflight, "memory_lines", lambda *args, **kwargs: [])
    monkeypatch.setattr(importlib.import_module("metaunlearn.unlearn_plan"), "memory_plan", lambda config: None)


def test_packaged_configs_name_shipped_assets_by_scheme():
    for path in CONFIGS:
        text = path.read_text()
        assert "../assets" not in text, path.name
    assert "model: toy://model" in (PACKAGE / "configs" / "toy_demo.yaml").read_text()


@pytest.mark.parametrize("name", ["toy_demo", "toy_robust"])
def test_a_copy_of_a_packaged_config_edited_elsewhere_plans(name, run_cli, tmp_path, monkeypatch):
    _no_memory_plan(monkeypatch)
    monkeypatch.setenv("COLUMNS", "400")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    copy = tmp_path / "mine" / f"{name}.yaml"
    copy.parent.mkdir()
    text = (PACKAGE / "configs" / f"{name}.yaml").read_text()
    assert "\n  steps: 60\n" in text
    copy.write_text(text.replace("\n  steps: 60\n", "\n  steps: 30\n", 1))  # the user's one edit
    result = run_cli("run", copy, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "input not found" not in result.stdout + result.stderr
    unlearn = run_cli("unlearn", copy, "--dry-run")
    assert unlearn.exit_code == 0, unlearn.stderr
    lines = " ".join(unlearn.stdout.split())
    assert f"model: {PACKAGE / 'assets' / 'toy' / 'model'}" in lines
    assert "train: 30 steps" in lines
    assert f"{work / 'runs' / name / 'data' / 'forget' / 'train'}" in lines  # runs/<name> in the working directory
    assert sorted(p.name for p in copy.parent.iterdir()) == [copy.name]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_packaged_config_never_runs_inside_the_package(path, tmp_path, monkeypatch):
    from metaunlearn.config import default_run_dir, read_yaml
    from metaunlearn.unlearn_config import load_unlearn_config

    monkeypatch.chdir(tmp_path)
    raw = read_yaml(path)
    run_dir = default_run_dir(path, raw.get("run_dir")).absolute()
    assert run_dir.parent == tmp_path / "runs"
    if "unlearn" in raw:
        config = load_unlearn_config(path)
        folders = [config.out, config.data.cache_dir, config.data.forget.train, config.data.related.test]
        assert all(Path(os.path.abspath(f)).is_relative_to(tmp_path / "runs") for f in folders), folders


def test_toy_scheme_resolves_to_the_shipped_assets_wherever_given(tmp_path):
    from metaunlearn.config import read_yaml, resolve_path
    from metaunlearn.errors import UserError

    assets = PACKAGE / "assets" / "toy"
    assert resolve_path("toy://model", tmp_path) == assets / "model"
    assert resolve_path(Path("toy://reference"), None) == assets / "reference"  # a Path folds the slashes
    assert resolve_path("toy://detector", tmp_path) == assets / "detector.safetensors"
    assert resolve_path("toy://retrain_red_triangle/model", tmp_path) == assets / "retrain_red_triangle" / "model"
    (tmp_path / "c.yaml").write_text("model: toy://model\neval: {quality: {fid_reference: toy://reference}}\n")
    raw = read_yaml(tmp_path / "c.yaml")
    assert raw["model"] == str(assets / "model")  # outside the package: the absolute path
    assert raw["eval"]["quality"]["fid_reference"] == str(assets / "reference")
    with pytest.raises(UserError, match="names no shipped toy asset"):
        resolve_path("toy://../configs", tmp_path)


def test_the_packaged_demo_records_the_same_paths_as_before(tmp_path):
    """Stage markers hold resolved settings: the packaged demo resolves its assets to the very strings the
    earlier relative spelling (../assets/toy/...) gave, so finished demo runs still resume."""
    from metaunlearn.experiment.demo import build_demo

    experiment = build_demo(run_dir=tmp_path / "demo", create=False)
    configs = PACKAGE / "configs"
    assert str(experiment.model_dir) == str(configs / "../assets/toy/model")
    assert experiment.config.eval.quality.fid_reference == "../assets/toy/reference"


@pytest.mark.parametrize("kind", [{}, {"robust": True}, {"quick": True}, {"all_attacks": True}], ids=str)
def test_the_demo_writes_nothing_into_the_package(kind, tmp_path, monkeypatch):
    """Every demo's run folder defaults to runs/demo* in the working directory, and its data to that folder's
    data/ (the robust demo once generated its data beside the packaged config)."""
    from metaunlearn.experiment.demo import build_demo

    monkeypatch.chdir(tmp_path)
    experiment = build_demo(create=False, **kind)
    run = experiment.run.path
    assert run.parent == tmp_path / "runs" and run.name.startswith("demo")
    assert experiment.data.root == run / "data" and experiment.data.cache_dir == run / "cache"
    assert build_demo(create=False, robust=True).run.path != build_demo(create=False).run.path


def test_config_init_writes_an_editable_copy(run_cli, tmp_path, monkeypatch):
    from metaunlearn.config import read_yaml

    monkeypatch.chdir(tmp_path)
    result = run_cli("config", "init", "toy_demo")
    assert result.exit_code == 0, result.stderr
    copy = tmp_path / "toy_demo.yaml"
    assert copy.read_text() == (PACKAGE / "configs" / "toy_demo.yaml").read_text()
    assert read_yaml(copy)["model"] == str(PACKAGE / "assets" / "toy" / "model")
    again = run_cli("config", "init", "toy_demo")
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert run_cli("config", "init", "toy_demo", "--overwrite").exit_code == 0
    (tmp_path / "mine").mkdir()
    assert run_cli("config", "init", "toy_robust", tmp_path / "mine").exit_code == 0
    assert (tmp_path / "mine" / "toy_robust.yaml").is_file()
    unknown = run_cli("config", "init", "nope")
    assert unknown.exit_code == 2 and "toy_demo, toy_robust" in unknown.stderr
