"""The unlearn stage and CLI: every method × {plain, meta} end to end on tiny SD-1.x, SDXL and the shipped toy model;
resume; config forms; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import metaunlearn
from metaunlearn.backbones.loading import load_backbone
from metaunlearn.data.imagefolder import write_imagefolder
from metaunlearn.errors import UserError
from metaunlearn.unlearn import UnlearnConfig, load_unlearn_config, run_unlearn
from metaunlearn.unlearn_plan import describe

TEXTS = {
    "forget": ["a photo of a nude person", "naked body"],
    "related": ["bare skin", "a woman on the beach"],
    "irrelevant": ["a dog in the park", "a red car on the street"],
}
TOY_MODEL = Path(metaunlearn.__file__).parent / "assets" / "toy" / "model"  # the shipped toy base model
FAST = {
    "esd": {"ddim_steps": 3},
    "sdd": {"ddim_steps": 3},
    "uce": {},
    "rece": {"epochs": 1},
}
META = {"batch_size": 2, "attacks": [{"steps": 1, "batch_size": 2, "lr": 1e-4}]}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Model folders of the three families and small image folders for every role and split."""
    from metaunlearn.testing.tiny_pipelines import save_tiny_pipeline

    root = tmp_path_factory.mktemp("unlearn-world")
    g = torch.Generator().manual_seed(0)
    for role, texts in TEXTS.items():
        for split in ("train", "test"):
            images = torch.rand(4, 3, 16, 16, generator=g)
            write_imagefolder(root / "data" / role / split, images, [texts[i % 2] for i in range(4)])
    return {
        "sd": save_tiny_pipeline("sd", root / "tiny-sd"),
        "sdxl": save_tiny_pipeline("sdxl", root / "tiny-sdxl"),
        "toy": TOY_MODEL,
        "data": root / "data",
    }


def config_dict(world, family: str, method: str, meta: bool, out: Path, **extra) -> dict:
    data = {role: {"train": str(world["data"] / role / "train"), "test": str(world["data"] / role / "test")}
            for role in TEXTS}
    return {
        "model": str(world[family]),
        "out": str(out),
        "method": {"name": method, "params": FAST[method]},
        "meta": META if meta else None,
        "data": {**data, "cache_dir": str(world["data"].parent / f"cache-{family}")},
        "forget_prompts": TEXTS["forget"],
        "preserve_prompts": TEXTS["irrelevant"],
        "steps": 2,
        "lr": 1e-3,
        "checkpoint_every": 1,
        "device": "cpu",
        **extra,
    }


@pytest.mark.parametrize("family", ["sd", "sdxl", "toy"])
@pytest.mark.parametrize("method", ["esd", "sdd", "uce", "rece"])
@pytest.mark.parametrize("meta", [False, True], ids=["plain", "meta"])
def test_every_method_plain_and_meta_end_to_end(world, tmp_path, family, method, meta):
    cfg = UnlearnConfig.model_validate(config_dict(world, family, method, meta, tmp_path / "run"))
    result = run_unlearn(cfg, progress=False)
    out = tmp_path / "run"
    assert json.loads((out / "config.json").read_text())["method"]["name"] == method
    trained = method in ("esd", "sdd") or meta
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()] if trained else []
    assert [r["step"] for r in log] == ([1, 2] if trained else [])
    if meta:
        assert {"retain_related", "attack_first", "ascent_forget_test", "grad_norm"} <= set(log[-1])
    if method in ("esd", "sdd"):
        assert method in log[-1]
    assert (out / "edit.json").is_file() == (method == "rece")
    original = load_file(str(world[family] / "unet" / "diffusion_pytorch_model.safetensors"))
    saved = load_file(str(result.model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(original)  # a plain diffusers UNet, no adapters
    assert any(not torch.equal(saved[k], original[k]) for k in original)
    reloaded = load_backbone(result.model)
    assert reloaded.family == family
    images = reloaded.sample(["a dog in the park"], steps=2, seed=0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_resume_is_bit_identical_with_ema_and_lora(world, tmp_path):
    meta = {"batch_size": 2, "attacks": [{"steps": 1, "batch_size": 2, "lr": 1e-3, "weight": 1.0},
                                         {"steps": 2, "batch_size": 2, "lr": 1e-2, "trainable": "lora", "weight": 1.0}]}
    straight = {**config_dict(world, "sd", "sdd", True, tmp_path / "a"), "meta": meta, "steps": 4}
    run_unlearn(UnlearnConfig.model_validate(straight), progress=False)
    first = {**config_dict(world, "sd", "sdd", True, tmp_path / "b"), "meta": meta, "steps": 2}
    run_unlearn(UnlearnConfig.model_validate(first), progress=False)
    run_unlearn(UnlearnConfig.model_validate({**first, "steps": 4}), progress=False)  # more steps: resumes
    a = load_file(str(tmp_path / "a" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(world["sd"] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(a) == set(b) == set(original)  # the LoRA attack left no adapter behind
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in lines]  # noqa: E731
    assert strip(log_a) == strip(log_b)


def test_anchor_to_start_resumes_anchored_to_the_stage_input(world, tmp_path):
    """anchor_to start after a closed-form edit: a run resumed from its checkpoint anchors to the same θ0 (the
    edited input, not the weights it resumed from), so it ends bit-identical to a straight run; the option is part
    of the stage's settings (changing it is refused) and of the dry-run description."""
    meta = {**META, "forget_term": "anchor", "anchor_to": "start", "beta_forget": 4.0,
            "attacks": [{"steps": 2, "batch_size": 2, "lr": 1e-2}]}
    straight = {**config_dict(world, "sd", "uce", True, tmp_path / "a"), "meta": meta, "steps": 4, "lr": 1e-2,
                "signals": None}
    run_unlearn(UnlearnConfig.model_validate(straight), progress=False)
    first = {**straight, "out": str(tmp_path / "b"), "steps": 2}
    run_unlearn(UnlearnConfig.model_validate(first), progress=False)
    run_unlearn(UnlearnConfig.model_validate({**first, "steps": 4}), progress=False)  # more steps: resumes
    current = {**straight, "out": str(tmp_path / "c"), "meta": {**meta, "anchor_to": "current"}}
    run_unlearn(UnlearnConfig.model_validate(current), progress=False)
    a, b, c = (load_file(str(tmp_path / x / "model" / "unet" / "diffusion_pytorch_model.safetensors")) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the anchor makes a difference within these steps
    with pytest.raises(UserError, match="anchor_to"):
        run_unlearn(UnlearnConfig.model_validate({**current, "out": str(tmp_path / "a")}), progress=False)
    lines = describe(UnlearnConfig.model_validate(straight))
    assert any("forget term anchored to the start model" in line for line in lines)
    assert any("start weights θ0" in line for line in lines)


def test_cli_dry_run_overrides_and_errors(world, tmp_path, run_cli):
    cfg = config_dict(world, "sd", "esd", False, tmp_path / "out")
    path = tmp_path / "unlearn.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_cli("unlearn", path, "--method", "rece", "--meta", "--dry-run")
    assert res.exit_code == 0, res.stderr
    assert "method: rece" in res.stdout and "meta (first order)" in res.stdout
    # the memory plan: its peak, split into the tensors (a GPU allocator's figure) and this CPU process's runtime
    out = " ".join(res.stdout.split())
    assert "meta step memory plan: peak" in out and "= tensors" in out and "+ runtime" in out
    assert not (tmp_path / "out").exists()
    res = run_cli("unlearn", path, "--method", "foo")
    assert res.exit_code == 2 and res.stderr.strip() == "error: unknown method 'foo' (choose esd, sdd, uce, rece)"
    no_data = {**cfg, "data": {}, "meta": META, "method": {"name": "uce"}}
    path.write_text(yaml.safe_dump(no_data))
    res = run_cli("unlearn", path, "--out", tmp_path / "o2", "-q")
    assert res.exit_code == 2 and "needs data.forget.train" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    path.write_text(yaml.safe_dump({**cfg, "method": {"name": "esd", "params": {"etta": 1}}}))
    res = run_cli("unlearn", path)
    assert res.exit_code == 2 and "etta" in res.stderr
    res = run_cli("unlearn", path.with_name("missing.yaml"))
    assert res.exit_code == 2 and "config file not found" in res.stderr


def test_cli_runs_and_experiment_file_form(world, tmp_path, run_cli):
    experiment = {
        "model": str(world["sd"]),
        "data": {"root": str(tmp_path / "unused"),
                 "forget": {"folder": str(world["data"] / "forget")},
                 "related": {"folder": str(world["data"] / "related")},
                 "irrelevant": {"folder": str(world["data"] / "irrelevant")}},
        "unlearn": {"method": {"name": "uce"}, "meta": META, "forget_prompts": TEXTS["forget"], "steps": 1,
                    "device": "cpu"},
        "attack": {"anything": "other commands validate their own sections"},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment))
    cfg = load_unlearn_config(path)
    assert cfg.model == world["sd"] and cfg.data.forget.train == world["data"] / "forget" / "train"
    assert cfg.out == Path("runs") / "experiment" / "uce-meta"
    res = run_cli("unlearn", path, "--out", tmp_path / "o", "--no-meta", "-q")
    assert res.exit_code == 0, res.stderr
    assert "uce-plain:" in res.stdout and (tmp_path / "o" / "model" / "model_index.json").is_file()
    assert json.loads((tmp_path / "o" / "config.json").read_text())["meta"] is None


def test_relative_ascent_cap_errors_plan_log_and_settings(world, tmp_path, run_cli):
    """``ascent_cap_ratio``: a one-line error unless exactly one cap is given, shown in the dry-run plan, the caps of
    every outer step in the train log (r × the unattacked loss), and a changed ratio or reference model
    (``ascent_cap_reference``) refused like any setting."""
    out = tmp_path / "out"

    def with_meta(world, out, meta) -> dict:
        return {**config_dict(world, "sd", "uce", True, out), "meta": meta}

    bounded = {**META, "beta_irrelevant": 0.0, "ascent_bound": "cap"}
    path = tmp_path / "unlearn.yaml"
    for meta, fragment in (({**bounded, "ascent_cap": 0.05, "ascent_cap_ratio": 2.5}, "exactly one of ascent_cap"),
                           (bounded, "exactly one of ascent_cap"),
                           ({**bounded, "ascent_cap_ratio": -1.0}, "meta.ascent_cap_ratio")):
        path.write_text(yaml.safe_dump(with_meta(world, out, meta)))
        res = run_cli("unlearn", path, "-q")
        assert res.exit_code == 2 and fragment in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()
    path.write_text(yaml.safe_dump(with_meta(world, out, {**bounded, "ascent_cap_ratio": 2.5})))
    res = run_cli("unlearn", path, "--dry-run")
    assert res.exit_code == 0 and "ascent bound cap 2.5 × the unattacked loss" in " ".join(res.stdout.split())
    res = run_cli("unlearn", path, "-q")
    assert res.exit_code == 0, res.stderr
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    for row in log:  # the related ascent batch is the retain batch (common random numbers): its cap is 2.5 × that loss
        assert row["cap_forget_test"] > 0 and row["cap_related"] == pytest.approx(2.5 * row["retain_related"], rel=1e-5)
    path.write_text(yaml.safe_dump(with_meta(world, out, {**bounded, "ascent_cap_ratio": 3.0})))
    res = run_cli("unlearn", path, "-q")
    assert res.exit_code == 2 and "meta.ascent_cap_ratio" in res.stderr and "--overwrite" in res.stderr, res.stderr
    # the reference model is a setting too: measured against θ0 it is refused the same way, and the plan says so
    path.write_text(yaml.safe_dump(with_meta(world, out, {**bounded, "ascent_cap_ratio": 2.5,
                                                          "ascent_cap_reference": "start"})))
    res = run_cli("unlearn", path, "--dry-run")
    assert res.exit_code == 0 and "ascent bound cap 2.5 × the start model's loss" in " ".join(res.stdout.split())
    assert "start weights θ0" in res.stdout
    res = run_cli("unlearn", path, "-q")
    assert res.exit_code == 2 and "meta.ascent_cap_reference" in res.stderr and "--overwrite" in res.stderr, res.stderr
    path.write_text(yaml.safe_dump(with_meta(world, out, {**bounded, "ascent_cap": 0.05, "ascent_cap_reference": "start"})))
    res = run_cli("unlearn", path, "-q")
    assert res.exit_code == 2 and "ascent_cap_reference" in res.stderr and len(res.stderr.strip().splitlines()) == 1
