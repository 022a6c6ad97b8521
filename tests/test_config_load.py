"""Config checks at load time: non-finite and non-positive numbers, runs the suite expands into, top-level typos.
Each bad file is refused with one line and exit code 2 before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metaunlearn.config import EXPERIMENT_SECTIONS
from metaunlearn.errors import UserError

from cli_checks import assert_user_error

SETS = {"hrm": {"data": "attack-data"}}


def write(tmp_path: Path, doc: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_top_level_sections_are_the_experiment_config_fields():
    from metaunlearn.experiment.config import ExperimentConfig

    assert EXPERIMENT_SECTIONS == tuple(ExperimentConfig.model_fields)


@pytest.mark.parametrize(
    "attack, fragments",
    [
        ({"sets": SETS, "lrs": [float("nan")]}, ["attack.lrs.0", "finite"]),
        ({"sets": SETS, "lrs": [float("inf")]}, ["attack.lrs.0", "finite"]),
        ({"sets": {"hrm": {"data": "d", "lrs": [-1e-4]}}}, ["attack.sets.hrm.lrs", "> 0"]),
        ({"sets": {"hrm": {"data": "d", "lora_lrs": [0.0]}}}, ["attack.sets.hrm.lora_lrs", "> 0"]),
        ({"sets": SETS, "modes": ["k"], "kinds": {"k": {"lrs": [float("inf")]}}}, ["attack.kinds.k.lrs.0", "finite"]),
        ({"sets": SETS, "reference_lr": float("nan")}, ["attack.reference_lr", "finite"]),
        ({"sets": SETS, "grad_clip": float("inf")}, ["attack.grad_clip", "finite"]),
        ({"sets": SETS, "snapshot_steps": [0, float("inf")]}, ["attack.snapshot_steps.1"]),
    ],
)
def test_attack_refuses_non_finite_and_non_positive_numbers(run_cli, tmp_path, tiny_sd_dir, attack, fragments):
    path = write(tmp_path, {"attack": attack})
    assert_user_error(run_cli("attack", tiny_sd_dir, path, "-q"), str(path), *fragments)
    assert not (tmp_path / "runs").exists() and not Path("runs", "config").exists()


@pytest.mark.parametrize(
    "meta, fragments",
    [
        ({"attacks": [{"lr": float("nan")}]}, ["unlearn.meta.attacks.0.lr", "finite"]),
        ({"attacks": [{"lr_range": [1e-5, float("inf")]}]}, ["unlearn.meta.attacks.0.lr_range.1", "finite"]),
        ({"beta_forget": float("inf")}, ["unlearn.meta.beta_forget", "finite"]),
    ],
)
def test_unlearn_refuses_non_finite_meta_numbers(run_cli, tmp_path, tiny_sd_dir, meta, fragments):
    doc = {"model": str(tiny_sd_dir), "unlearn": {"forget_prompts": ["a cat"], "meta": meta}}
    path = write(tmp_path, doc)
    result = run_cli("unlearn", path, "--dry-run")
    assert_user_error(result, *[f.removeprefix("unlearn.") for f in fragments])


def test_unlearn_refuses_a_non_finite_learning_rate(run_cli, tmp_path, tiny_sd_dir):
    path = write(tmp_path, {"model": str(tiny_sd_dir), "forget_prompts": ["a cat"], "lr": float("nan")})
    assert_user_error(run_cli("unlearn", path, "--dry-run"), "'lr'", "finite")


def test_a_sequential_kind_past_a_sets_last_snapshot_is_refused_at_load(run_cli, tmp_path, tiny_sd_dir):
    """The suite's snapshots leave room after the 10 'before' steps, set 'short''s own do not: refused when the
    file is read, naming the set and the kind, not when that run starts."""
    attack = {"sets": {"hrm": {"data": "a"}, "short": {"data": "b", "snapshot_steps": [0, 10]}},
              "snapshot_steps": [0, 20], "modes": ["full", "seq"],
              "kinds": {"seq": {"before": [{"set": "hrm", "steps": 10}]}}}
    path = write(tmp_path, {"attack": attack})
    assert_user_error(run_cli("attack", tiny_sd_dir, path, "-q"), "attack set 'short', kind 'seq'", "'before' stages")
    warm = {"sets": SETS, "modes": ["w"], "kinds": {"w": {"warmup_steps": 5}}}  # the suite's schedule: constant
    path = write(tmp_path, {"attack": warm})
    assert_user_error(run_cli("attack", tiny_sd_dir, path, "-q"), "kind 'w'", "constant_with_warmup")


def test_top_level_typos_are_refused_by_every_command(run_cli, tmp_path, tiny_sd_dir):
    attack = write(tmp_path, {"attack": {"sets": SETS}, "evl": {"samples_per_prompt": 1}}, "attack.yaml")
    assert_user_error(run_cli("attack", tiny_sd_dir, attack, "-q"), str(attack), "unknown key 'evl'", "eval")
    generate = write(tmp_path, {"model": str(tiny_sd_dir), "data": {"forget": {"prompts": ["a"]}}, "atack": {}},
                     "gen.yaml")
    assert_user_error(run_cli("generate", "--config", generate), "unknown key 'atack'")
    unlearn = write(tmp_path, {"model": str(tiny_sd_dir), "unlearn": {"forget_prompts": ["a"]}, "gird": {}}, "unl.yaml")
    assert_user_error(run_cli("unlearn", unlearn, "--dry-run"), "unknown key 'gird'")
    report = write(tmp_path, {"reprot": {"title": "x"}}, "report.yaml")
    assert_user_error(run_cli("report", tmp_path, "--config", report), "unknown key 'reprot'")
    experiment = write(tmp_path, {"model": str(tiny_sd_dir), "evl": {}}, "run.yaml")
    assert_user_error(run_cli("run", experiment, "--dry-run"), "unknown key 'evl'")


def test_api_refuses_a_top_level_typo_in_a_config_file(tmp_path):
    from metaunlearn.api import _section
    from metaunlearn.attacks.suite_config import AttackSuiteConfig
    from metaunlearn.errors import UserError

    path = write(tmp_path, {"attack": {"sets": SETS}, "evl": {}})
    with pytest.raises(UserError, match="unknown key 'evl'"):
        _section(path, "attack", AttackSuiteConfig)
    assert _section({"attack": {"sets": SETS}, "other": 1}, "attack", AttackSuiteConfig)[0].sets  # a mapping: as given


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_attack_refuses_a_dtype_the_cpu_cannot_finetune_in(run_cli, tmp_path, tiny_sd_dir, dtype):
    """Half-precision weights on the CPU met the float32 cached data in the UNet's first matmul (a traceback after
    the run folder was written); now refused before anything is loaded or written, naming what works."""
    path = write(tmp_path, {"attack": {"sets": SETS}})
    result = run_cli("attack", tiny_sd_dir, path, "-o", tmp_path / "run", "--device", "cpu", "--dtype", dtype, "-q")
    assert_user_error(result, f"dtype {dtype} cannot finetune on cpu", "what works there: fp32")
    assert not (tmp_path / "run").exists()
    assert_user_error(run_cli("attack", tiny_sd_dir, path, "--dtype", "fp17"), "unknown dtype 'fp17'")


def test_the_api_refuses_a_torch_dtype_the_cpu_cannot_finetune_in(tmp_path, tiny_sd_dir):
    import torch

    import metaunlearn
    from metaunlearn.errors import UserError

    with pytest.raises(UserError, match="dtype bf16 cannot finetune on cpu"):
        metaunlearn.attack(tiny_sd_dir, {"attack": {"sets": SETS}}, tmp_path / "run", device="cpu", dtype=torch.bfloat16)
    assert not (tmp_path / "run").exists()


def test_an_api_config_file_without_the_optional_eval_section(tmp_path, monkeypatch):
    """``metaunlearn.attack(model, FILE)`` reads ``eval`` only when the file has one (as the command does); a file
    without it was validated whole as the eval section ("missing required key 'prompt_sets'")."""
    import metaunlearn
    from metaunlearn.attacks import stage

    seen = {}

    def attack_model(*args, eval_config=None, **kwargs):
        seen["eval"] = eval_config
        raise UserError("stop here")

    monkeypatch.setattr(stage, "attack_model", attack_model)
    path = write(tmp_path, {"attack": {"sets": SETS}})
    with pytest.raises(UserError, match="stop here"):
        metaunlearn.attack(tmp_path / "model", path, tmp_path / "run", device="cpu")
    assert seen == {"eval": None}
