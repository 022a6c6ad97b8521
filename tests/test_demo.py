"""The packaged demo config validates and plans every stage (the full run itself is `make demo`)."""

from __future__ import annotations


def test_demo_plan_lists_every_stage(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    result = run_cli("demo", "--dry-run", "--run-dir", tmp_path / "demo")
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    for method in ("esd", "sdd", "uce", "rece"):
        for variant in ("plain", "meta"):
            assert f"unlearn {method}-{variant}" in text
            assert f"attack {method}-{variant}" in text
    assert "attack retrain" in text and "unlearn retrain" not in text  # the reference is attacked, never built
    assert "report" in text
    assert not (tmp_path / "demo" / "models").exists()  # a dry run builds nothing


def test_demo_rejects_zero_seeds(run_cli):
    result = run_cli("demo", "--seeds", "0", "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_grid_entry_overrides_reach_only_its_meta_variant(tmp_path):
    from metaunlearn.experiment.demo import demo_config_path
    from metaunlearn.experiment.runner import Experiment, load_experiment

    config, _, base = load_experiment(demo_config_path())
    entry = config.grid.methods[0].model_copy(update={
        "meta": {"beta_forget": 0.5, "attacks": [{"steps": 7, "lr": 2e-4}]},
        "meta_params": {"eta": 3.0}, "meta_steps": 11, "meta_lr": 5e-5,
    })
    grid = config.grid.model_copy(update={"methods": [entry]})
    experiment = Experiment(config.model_copy(update={"grid": grid}), base, tmp_path / "run")
    plain, meta = [m for m in experiment.models() if m.entry is not None]  # the grid models, not the reference
    plain_cfg, meta_cfg = experiment.unlearn_config(plain), experiment.unlearn_config(meta)
    assert plain_cfg.meta is None
    assert plain_cfg.method.params["eta"] == entry.params["eta"] and plain_cfg.steps == entry.steps
    assert meta_cfg.method.params["eta"] == 3.0 and meta_cfg.steps == 11 and meta_cfg.lr == 5e-5
    assert meta_cfg.meta.beta_forget == 0.5 and meta_cfg.meta.attacks[0].steps == 7
    # keys the entry does not name keep the template's values
    assert meta_cfg.meta.gamma_related == config.unlearn["meta"]["gamma_related"]


def test_grid_seeds_replicate_models_and_shift_attack_seeds(tmp_path):
    from metaunlearn.experiment.demo import build_demo

    experiment = build_demo(seeds=2, run_dir=tmp_path / "run")
    models = experiment.models()
    assert [m.key for m in models if m.name == "esd-meta"] == ["esd-meta", "esd-meta.s1"]
    first, second = [m for m in models if m.name == "esd-meta"]
    assert experiment.model_folder(second) == experiment.run.path / "models" / "esd-meta.s1" / "model"
    assert experiment.unlearn_config(second).seed == experiment.unlearn_config(first).seed + 1
    assert experiment._suite(1).seeds == [s + 1 for s in experiment._suite(0).seeds]


def test_grid_and_attack_seeds_cannot_both_vary(tmp_path):
    import pytest

    from metaunlearn.experiment.config import ExperimentConfig
    from metaunlearn.experiment.demo import demo_config_path
    from metaunlearn.experiment.runner import load_experiment

    config, raw, _ = load_experiment(demo_config_path())
    raw = {**raw, "grid": {**raw["grid"], "seeds": [0, 1]}, "attack": {**raw["attack"], "seeds": [0, 1]}}
    with pytest.raises(ValueError, match="not both"):
        ExperimentConfig.model_validate(raw)


def test_meta_from_plain_starts_the_meta_variant_from_the_plain_model(tmp_path):
    import pytest

    from metaunlearn.experiment.config import GridConfig
    from metaunlearn.experiment.demo import demo_config_path
    from metaunlearn.experiment.runner import Experiment, load_experiment

    config, _, base = load_experiment(demo_config_path())
    entry = config.grid.methods[0].model_copy(update={"meta_from_plain": True})
    grid = config.grid.model_copy(update={"methods": [entry], "seeds": [0, 3]})
    experiment = Experiment(config.model_copy(update={"grid": grid}), base, tmp_path / "run")
    by_key = {m.key: m for m in experiment.models()}
    plain, meta = by_key[f"{entry.model_label}-plain.s3"], by_key[f"{entry.model_label}-meta.s3"]
    assert experiment.unlearn_config(meta).model == experiment.model_folder(plain)
    assert experiment.unlearn_config(plain).model == experiment.model_dir
    with pytest.raises(ValueError, match="meta_from_plain"):
        GridConfig(methods=[entry], variants=["meta"])


def test_stages_wait_for_the_models_they_need(tmp_path):
    """The parallel scheduler's order: a from-plain meta model after its plain twin, an attack after its model."""
    from metaunlearn.experiment.demo import build_demo

    experiment = build_demo(seeds=2, run_dir=tmp_path / "run")
    tasks = {t.stage: t for seed in (0, 1) for t in experiment.tasks(seed)}
    assert tasks["unlearn-esd-meta.s1"].after == ("unlearn-esd-plain.s1",)  # the demo's ESD meta starts from plain
    assert tasks["unlearn-uce-meta"].after == ()  # UCE's meta variant starts from the base model
    assert tasks["attack-sdd-meta"].after == ("unlearn-sdd-meta",)
    # 8 models and 2 equal-damage controls per seed, each unlearned and attacked, and the reference attacked
    assert len(tasks) == 2 * (2 * 10 + 1)
    assert tasks["attack-sdd-control.s1"].after == ("unlearn-sdd-control.s1",)
    assert tasks["attack-retrain.s1"].after == ()
    order = [t.stage for t in experiment.tasks(0)]
    assert all(order.index(a) < order.index(s) for s, t in tasks.items() if s in order for a in t.after)


def test_robust_demo_plans_uce_against_a_grid_wider_than_its_simulated_attacks(run_cli, tmp_path, monkeypatch):
    from metaunlearn.experiment.demo import build_demo

    monkeypatch.setenv("COLUMNS", "400")
    result = run_cli("demo", "--robust", "--dry-run", "--run-dir", tmp_path / "robust")
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    for stage in ("unlearn uce-plain", "unlearn uce-meta", "attack uce-meta", "attack data hrm-r", "attack retrain"):
        assert stage in text
    experiment = build_demo(robust=True, run_dir=tmp_path / "robust")
    config = experiment.config
    simulated = config.unlearn["meta"]["attacks"]
    highest = max(a["lr_range"][1] for a in simulated)
    suite = config.attack
    assert suite.reference_lr == highest
    lrs = {(s.kind, s.optimizer, s.mode, s.subset, s.lr) for name in suite.sets for s in suite.specs(name)}
    assert {lr for kind, opt, mode, subset, lr in lrs if opt == "adamw" and mode == "full" and subset == "full"} \
        >= {highest, 3 * highest, 10 * highest}
    assert any(opt == "sgd" for _, opt, *_ in lrs) and not any(a.get("optimizer") == "sgd" for a in simulated)
    assert any(mode == "lora" for _, _, mode, *_ in lrs) and not any(a.get("trainable") == "lora" for a in simulated)
    assert all(spec.source == "render" for spec in config.attack_data.values())
    assert run_cli("demo", "--robust", "--quick", "--dry-run").exit_code == 2


def test_rendered_attack_set_holds_the_prompts_concepts(tmp_path):
    from metaunlearn.data.imagefolder import read_imagefolder
    from metaunlearn.metrics.detectors import build_detector
    from metaunlearn.toyworld.attack_data import render_folder

    folder = render_folder(["red triangle", "a green circle"], tmp_path / "set", images_per_prompt=4, seed=0)
    data = read_imagefolder(folder)
    assert data.texts == ["red triangle"] * 4 + ["a green circle"] * 4
    detector = build_detector("toy")
    assert bool(detector.detects(data.images[:4], "red_triangle").all())
    assert bool(detector.detects(data.images[4:], "green_circle").all())
    again = read_imagefolder(render_folder(["red triangle"], tmp_path / "again", images_per_prompt=4, seed=0))
    assert (again.images == data.images[:4]).all()  # deterministic per seed
