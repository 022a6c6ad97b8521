"""Results that can be trusted, through the real CLI: results keyed by the model's identity, no stale result reused
after a setting changed, nothing good overwritten by a failure, OS errors as one line, config-relative paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from metaunlearn.data.imagefolder import write_imagefolder
from metaunlearn.identity import model_identity
from metaunlearn.unlearn import UnlearnConfig, run_unlearn

from cli_checks import assert_user_error, snapshot

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FORGET = ["a photo of a nude person", "naked body"]
EVAL = {
    "detector": {"kind": "toy"},
    "prompt_sets": [{"name": "forget", "role": "forget", "concept": "red_triangle", "prompts": ["a red triangle"]}],
    "samples_per_prompt": 2,
    "sampler": {"steps": 2, "guidance": 2.0},
}
ATTACK = {"sets": {"hrm": {"data": "attack-data"}}, "lrs": [1e-3], "snapshot_steps": [0, 1], "batch_size": 2,
          "grid_images": 2}


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD base model, two different UCE plain models both in folders named ``model``, a UCE meta model, an
    attack data folder and a config file beside it (relative paths)."""
    from metaunlearn.testing.tiny_pipelines import save_tiny_pipeline

    root = tmp_path_factory.mktemp("trust")
    base = save_tiny_pipeline("sd", root / "base")
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    write_imagefolder(root / "attack-data", images, [FORGET[i % 2] for i in range(4)])
    for split in ("train", "test"):
        write_imagefolder(root / "forget" / split, images, [FORGET[i % 2] for i in range(4)])

    def unlearn(out: str, prompts: list[str], meta: bool = False) -> Path:
        cfg = {"model": str(base), "out": str(root / out), "method": {"name": "uce"}, "forget_prompts": prompts,
               "device": "cpu", "steps": 1}
        if meta:
            cfg["meta"] = {"batch_size": 2, "beta_related": 0, "beta_irrelevant": 0, "gamma_related": 0,
                           "gamma_irrelevant": 0, "attacks": [{"steps": 1, "batch_size": 2, "lr": 1e-4}]}
            cfg["data"] = {"forget": {"train": str(root / "forget" / "train"), "test": str(root / "forget" / "test")}}
        return run_unlearn(UnlearnConfig.model_validate(cfg), progress=False).model

    config = root / "experiment.yaml"
    config.write_text(yaml.safe_dump({"attack": ATTACK, "eval": EVAL}))
    return {"root": root, "base": base, "a": unlearn("A", FORGET[:1]), "b": unlearn("B", FORGET[1:]),
            "meta": unlearn("M", FORGET, meta=True), "config": config}


def rows_of(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for f in sorted((run_dir / "attacks" / name).glob("*/*.jsonl"))
            for line in f.read_text().splitlines()]


# ---- 1. result identity ----------------------------------------------------------------------------------------------
def test_results_are_keyed_by_the_models_identity_not_its_folder_name(lab, run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths of the config are relative to the config, not to here
    run = tmp_path / "R"
    assert lab["a"].name == lab["b"].name == "model"
    a, b = model_identity(lab["a"]), model_identity(lab["b"])
    assert (a.method, a.variant) == ("uce", "plain") and a.fingerprint != b.fingerprint

    res = run_cli("attack", lab["a"], lab["config"], "-o", run, "-q")
    assert res.exit_code == 0, res.stderr
    rows = rows_of(run, "uce-plain")
    assert rows and {(r["method"], r["variant"], r["model_fingerprint"]) for r in rows} == {("uce", "plain", a.fingerprint)}
    before = snapshot(run)

    # The README's recipe names every model folder "model": B's results must never be filed as A's.
    res = run_cli("attack", lab["b"], lab["config"], "-o", run, "-q")
    assert_user_error(res, "another model", str(a.path), "--name")
    assert snapshot(run) == before

    res = run_cli("attack", lab["b"], lab["config"], "-o", run, "--name", "uce-plain-b", "-q")
    assert res.exit_code == 0, res.stderr
    assert {r["model_fingerprint"] for r in rows_of(run, "uce-plain-b")} == {b.fingerprint}
    res = run_cli("attack", lab["a"], lab["config"], "-o", run, "--variant", "meta", "-q")
    assert_user_error(res, "was unlearned with variant 'plain', not 'meta'")

    res = run_cli("attack", lab["meta"], lab["config"], "-o", run, "-q")
    assert res.exit_code == 0, res.stderr
    assert {(r["method"], r["variant"]) for r in rows_of(run, "uce-meta")} == {("uce", "meta")}
    res = run_cli("attack", lab["base"], lab["config"], "-o", run, "-q")
    assert res.exit_code == 0, res.stderr
    assert {(r["model"], r["method"], r["variant"]) for r in rows_of(run, "base")} == {("base", "base", "base")}
    assert not (tmp_path / "attack-data").exists() and not (tmp_path / "runs").exists()


# ---- 2. no stale results ---------------------------------------------------------------------------------------------
def test_changed_attack_or_eval_settings_are_refused_and_overwrite_leaves_no_stale_grid(lab, run_cli, tmp_path):
    config = lab["root"] / "stale.yaml"
    run = tmp_path / "R"

    def write(attack: dict, eval_: dict) -> None:
        config.write_text(yaml.safe_dump({"attack": attack, "eval": eval_}))

    write(ATTACK, EVAL)
    assert run_cli("attack", lab["a"], config, "-o", run, "-q").exit_code == 0
    before = snapshot(run)
    res = run_cli("attack", lab["a"], config, "-o", run, "-q")  # same settings: reused, nothing rewritten
    assert res.exit_code == 0 and "already done" in res.stdout
    assert snapshot(run) == before

    write({**ATTACK, "batch_size": 4}, EVAL)
    assert_user_error(run_cli("attack", lab["a"], config, "-o", run, "-q"), "specs.0.batch_size", "--overwrite")
    other_prompts = {**EVAL, "prompt_sets": [{**EVAL["prompt_sets"][0], "prompts": ["a crimson triangle"]}]}
    write(ATTACK, other_prompts)
    assert_user_error(run_cli("attack", lab["a"], config, "-o", run, "-q"), "eval.prompt_sets.0.prompts")
    prompt_file = lab["root"] / "forget-prompts.txt"
    prompt_file.write_text("a red triangle\n")
    from_file = {**EVAL, "prompt_sets": [{**EVAL["prompt_sets"][0], "prompts": [], "prompts_file": prompt_file.name}]}
    write(ATTACK, from_file)
    assert run_cli("attack", lab["a"], config, "-o", run, "-q", "--overwrite").exit_code == 0
    prompt_file.write_text("a triangle painted red\n")  # the file's content changed, not the config
    assert_user_error(run_cli("attack", lab["a"], config, "-o", run, "-q"), "eval_inputs.prompts")
    assert snapshot(run) != before

    write({**ATTACK, "snapshot_steps": [0, 2]}, EVAL)
    res = run_cli("attack", lab["a"], config, "-o", run, "-q", "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert sorted(r["step"] for r in rows_of(run, "uce-plain")) == [0, 2]
    grids = sorted(p.name for p in (run / "grids").rglob("*.png"))
    assert grids == ["step0.png", "step2.png"]  # no step1.png left from the earlier settings



KINDS = {
    "sgd-x": {"mode": "full", "subset": "xattn", "optimizer": "sgd", "momentum": 0.9},
    "lora8": {"mode": "lora", "lora": {"rank": 8, "alpha": 8}},
    "db": {"mode": "full", "dreambooth": {"instance_prompt": "a sks person", "class_prompt": "a person",
                                          "class_images": 2, "sampler_steps": 2}},
    "ti": {"mode": "textual_inversion", "textual_inversion": {"token": "<x>", "init_words": "person"}},
    "seq": {"mode": "full", "before": [{"set": "other", "steps": 1}]},
}


def test_a_changed_setting_of_any_attack_kind_is_refused_and_overwrite_redoes_it(lab, run_cli, tmp_path):
    """The settings marker of every model x set holds every run's full settings: changing one setting of one
    kind (or of a prompt attack, or the data a sequential kind trains on first) is never silently reused."""
    shutil.copytree(lab["root"] / "attack-data", lab["root"] / "other-data", dirs_exist_ok=True)
    config, run = lab["root"] / "kinds.yaml", tmp_path / "R"
    attack = {**ATTACK, "sets": {"hrm": {"data": "attack-data"}, "other": {"data": "other-data", "modes": ["full"]}},
              "modes": list(KINDS), "kinds": KINDS, "snapshot_steps": [0, 2], "grid_images": 0,
              "prompt_attacks": {"cv": {"kind": "concept_vector", "strength": 1.0, "concept_prompts": ["a nude person"],
                                        "neutral_prompts": ["a person"]}}}

    def attack_with(**changes) -> object:
        cfg = json.loads(json.dumps(attack))
        for path, value in changes.items():
            *parents, last = path.split("__")
            node = cfg
            for key in parents:
                node = node[int(key)] if isinstance(node, list) else node[key]
            node[last] = value
        config.write_text(yaml.safe_dump({"attack": cfg, "eval": EVAL}))
        return cfg

    attack_with()
    res = run_cli("attack", lab["a"], config, "-o", run, "--set", "hrm", "-q")
    assert res.exit_code == 0, res.stderr
    before = snapshot(run)
    changes = [
        ({"kinds__sgd-x__momentum": 0.5}, "momentum"),
        ({"kinds__sgd-x__subset": "noxattn"}, "subset"),
        ({"kinds__lora8__lora__rank": 4}, "lora.rank"),
        ({"kinds__db__dreambooth__class_images": 3}, "dreambooth.class_images"),
        ({"kinds__db__dreambooth__instance_prompt": "a zwx person"}, "dreambooth.instance_prompt"),
        ({"kinds__ti__textual_inversion__init_words": "a"}, "textual_inversion.init_words"),
        ({"kinds__seq__before__0__set": "hrm"}, "before.0.set"),
        ({"prompt_attacks__cv__strength": 2.0}, "prompt_attack.strength"),
    ]
    for change, key in changes:
        attack_with(**change)
        assert_user_error(run_cli("attack", lab["a"], config, "-o", run, "--set", "hrm", "-q"), key, "--overwrite")
        assert snapshot(run) == before, change
    attack_with()
    (lab["root"] / "other-data" / "metadata.jsonl").write_text(
        (lab["root"] / "attack-data" / "metadata.jsonl").read_text().replace("naked body", "a naked body"))
    assert_user_error(run_cli("attack", lab["a"], config, "-o", run, "--set", "hrm", "-q"), "stage_data.other")
    shutil.copytree(lab["root"] / "attack-data", lab["root"] / "other-data", dirs_exist_ok=True)
    res = run_cli("attack", lab["a"], config, "-o", run, "--set", "hrm", "-q")  # as before: reused
    assert res.exit_code == 0 and snapshot(run) == before

    old = {r["step"]: r["attack_loss"] for r in rows_of(run, "uce-plain") if r["mode"] == "sgd-x"}
    attack_with(**{"kinds__sgd-x__momentum": 0.5})
    res = run_cli("attack", lab["a"], config, "-o", run, "--set", "hrm", "-q", "--overwrite")
    assert res.exit_code == 0, res.stderr
    new = {r["step"]: r["attack_loss"] for r in rows_of(run, "uce-plain") if r["mode"] == "sgd-x"}
    assert new[0] == old[0] and new[2] != old[2]  # redone under the new momentum (its second step differs)
    marker = json.loads((run / "stages" / "attack" / "uce-plain" / "hrm.json").read_text())
    assert {s["momentum"] for s in marker["settings"]["specs"] if s["name"] == "sgd-x"} == {0.5}


# ---- 3. nothing good overwritten on failure; unlearn resumes by default --------------------------------------------
def test_failed_unlearn_leaves_the_finished_run_intact_and_reruns_resume(lab, run_cli, tmp_path, tiny_sd_copy):
    out = tmp_path / "out"
    cfg = {"model": str(lab["base"]), "method": {"name": "esd", "params": {"ddim_steps": 2}}, "forget_prompts": FORGET,
           "steps": 2, "checkpoint_every": 1, "device": "cpu"}
    path = tmp_path / "unlearn.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_cli("unlearn", path, "-o", out, "-q").exit_code == 0
    assert (out / "checkpoint").is_dir() and (out / "model" / "unlearn_config.json").is_file()
    good = snapshot(out)

    not_diffusers = tmp_path / "not-a-model"
    not_diffusers.mkdir()
    path.write_text(yaml.safe_dump({**cfg, "model": str(not_diffusers)}))
    assert_user_error(run_cli("unlearn", path, "-o", out, "-q"), "not a diffusers pipeline folder")
    assert snapshot(out) == good
    weights = next((tiny_sd_copy / "unet").glob("*.safetensors"))
    weights.rename(weights.with_suffix(".bin"))
    path.write_text(yaml.safe_dump({**cfg, "model": str(tiny_sd_copy)}))
    assert_user_error(run_cli("unlearn", path, "-o", out, "-q"), "pickle")
    assert snapshot(out) == good
    empty = tmp_path / "empty"
    write_imagefolder(empty / "train", torch.rand(0, 3, 16, 16), [])
    meta = {**cfg, "meta": {"batch_size": 2}, "data": {"forget": {"train": str(empty / "train"),
                                                                  "test": str(tmp_path / "missing")}}}
    path.write_text(yaml.safe_dump(meta))
    assert_user_error(run_cli("unlearn", path, "-o", out, "-q"))
    assert snapshot(out) == good

    path.write_text(yaml.safe_dump(cfg))  # the same settings again: nothing redone, the checkpoint kept
    res = run_cli("unlearn", path, "-o", out, "-q")
    assert res.exit_code == 0 and "already done" in res.stdout
    assert snapshot(out) == good
    path.write_text(yaml.safe_dump({**cfg, "seed": 1}))
    assert_user_error(run_cli("unlearn", path, "-o", out, "-q"), "config.seed", "--overwrite")
    assert snapshot(out) == good
    res = run_cli("unlearn", path, "-o", out, "-q", "--overwrite")
    assert res.exit_code == 0, res.stderr
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    path.write_text(yaml.safe_dump({**cfg, "seed": 1, "steps": 3}))  # more steps continue from the checkpoint
    res = run_cli("unlearn", path, "-o", out, "-q")
    assert res.exit_code == 0 and "3 steps" in res.stdout
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]


# ---- 4. OS errors are input errors -------------------------------------------------------------------------------------
def _result_rows(run: Path) -> None:
    for model, variant in (("esd-plain", "plain"), ("esd-meta", "meta")):
        rows = [{"model": model, "method": "esd", "variant": variant, "attack_set": "hrm-m", "mode": "full",
                 "lr": 1e-4, "seed": 0, "step": step, "grid": None, "forget_rate": rate}
                for step, rate in ((0, 0.0), (10, 0.5 if variant == "plain" else 0.1))]
        folder = run / "attacks" / model / "hrm-m"
        folder.mkdir(parents=True)
        (folder / "full_lr0.0001_s0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_os_errors_are_one_line_and_keep_the_previous_report(run_cli, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _result_rows(run)
    assert run_cli("report", run).exit_code == 0
    good = snapshot(run)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert_user_error(run_cli("report", run, "-o", blocker / "sub"), str(blocker))

    import metaunlearn.atomic

    def denied(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(metaunlearn.atomic.os, "replace", denied)
    assert_user_error(run_cli("report", run), "Permission denied", "earlier outputs are unchanged")
    monkeypatch.undo()
    assert snapshot(run) == good

    # A disk that fills up mid-report (the file-size limit makes the kernel refuse writes past 16 KiB, as ENOSPC
    # would): exit 2, one line, and every earlier report file byte for byte as it was.
    import resource
    import signal

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "metaunlearn.cli", "report", str(run), "--title", "new"],
                          capture_output=True, text=True, preexec_fn=small_files, env=env, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "File too large" in lines[0], proc.stderr
    assert snapshot(run) == good
    assert not [p for p in run.rglob(".*") if p.name != "stages"]  # no temporary file left behind


# ---- 5. paths mean one thing; a dry run checks everything and creates nothing -----------------------------------------
def test_dry_run_lists_missing_inputs_validates_and_creates_nothing(run_cli, tmp_path, monkeypatch):
    configs = Path(shutil.copytree(CONFIGS, tmp_path / "configs"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p for p in tmp_path.rglob("*"))
    res = run_cli("run", configs / "sd14_nudity.yaml", "--dry-run")
    assert res.exit_code == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert "/models/stable-diffusion-v1-4: edit 'model'" in out
    assert "/models/clip-vit-large-patch14: edit eval.quality.fid_features_path" in out
    assert "edit eval.quality.fid_reference" in out and "input(s) missing" in out
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing created, not even the run folder
    res = run_cli("run", configs / "sd14_nudity.yaml")  # a real run refuses before writing anything
    assert_user_error(res, "input not found: /models/stable-diffusion-v1-4", "see --dry-run")
    assert sorted(p for p in tmp_path.rglob("*")) == before

    cfg = yaml.safe_load((configs / "sd14_nudity.yaml").read_text())
    cfg["unlearn"]["steps"] = "ten"
    (configs / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert_user_error(run_cli("run", configs / "bad.yaml", "--dry-run"), "steps")
    assert not (work / "runs").exists()


def test_run_refuses_changed_settings_unless_overwrite(lab, run_cli, tmp_path):
    cfg = {"model": "base", "attack": {**ATTACK, "sets": {"hrm": {"data": "attack-data"}}}, "eval": EVAL,
           "run_dir": "runs/exp"}
    path = lab["root"] / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_cli("run", path, "-q")
    assert res.exit_code == 0, res.stderr
    run = lab["root"] / "runs" / "exp"  # run_dir relative to the config file
    assert (run / "report.html").is_file()
    res = run_cli("run", path, "-q")
    assert res.exit_code == 0 and "skip attack-base" in res.stdout
    path.write_text(yaml.safe_dump({**cfg, "eval": {**EVAL, "samples_per_prompt": 3}}))
    assert_user_error(run_cli("run", path, "-q"), "stage attack-base", "eval.samples_per_prompt", "--overwrite")
    res = run_cli("run", path, "-q", "--overwrite")
    assert res.exit_code == 0, res.stderr
