"""Bad input through the real CLI: exit code 2, one line ``error: ...``, no traceback, no good output replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from metaunlearn.data.imagefolder import METADATA_FILE, write_imagefolder

from cli_checks import assert_user_error, snapshot

FAST = ["--steps", "2", "--guidance", "2", "--quiet"]


@pytest.fixture
def good_output(tmp_path) -> Path:
    """An existing, valid image folder that a failing command must leave untouched."""
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return write_imagefolder(tmp_path / "existing", images, ["a dog", "a cat"])


def write_config(tmp_path: Path, data: dict, model: Path | None = None, name: str = "config.yaml") -> Path:
    doc = {"data": data}
    if model is not None:
        doc["model"] = str(model)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


# ---- models --------------------------------------------------------------------------------------------------------
def test_missing_model_folder(run_cli, tmp_path, good_output):
    before = snapshot(good_output)
    result = run_cli("generate", tmp_path / "no-such-model", "--prompts", "a dog", "--out", good_output, *FAST)
    assert_user_error(result, "model folder not found", "no-such-model")
    assert snapshot(good_output) == before


def test_non_diffusers_folder(run_cli, tmp_path):
    folder = tmp_path / "random"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"x")
    result = run_cli("generate", folder, "--prompts", "a dog", "--out", tmp_path / "out", *FAST)
    assert_user_error(result, "not a diffusers pipeline folder", "model_index.json")
    assert not (tmp_path / "out").exists()


def test_unknown_backbone(run_cli, tiny_sd_copy, tmp_path):
    index = tiny_sd_copy / "model_index.json"
    doc = json.loads(index.read_text())
    doc["_class_name"] = "KandinskyPipeline"
    index.write_text(json.dumps(doc))
    result = run_cli("generate", tiny_sd_copy, "--prompts", "a dog", "--out", tmp_path / "out", *FAST)
    assert_user_error(result, "unsupported pipeline 'KandinskyPipeline'", "StableDiffusionPipeline")


def test_pickle_weights_are_refused(run_cli, tiny_sd_copy, tmp_path, good_output):
    unet = tiny_sd_copy / "unet"
    weights = next(unet.glob("*.safetensors"))
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), unet / "diffusion_pytorch_model.bin")  # a pickle, as old checkpoints are
    weights.unlink()
    before = snapshot(good_output)
    result = run_cli("generate", tiny_sd_copy, "--prompts", "a dog", "--out", good_output, "--overwrite", *FAST)
    assert_user_error(result, "diffusion_pytorch_model.bin is a pickle", "safetensors weights only")
    assert snapshot(good_output) == before


# ---- configs -------------------------------------------------------------------------------------------------------
def test_malformed_yaml(run_cli, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  forget: {prompts: [a dog\n  related: 3\n")
    assert_user_error(run_cli("generate", "--config", path), str(path), "malformed YAML (line")


def test_unknown_config_key(run_cli, tmp_path, tiny_sd_dir):
    path = write_config(tmp_path, {"forget": {"promts": ["a nude person"]}}, tiny_sd_dir)
    assert_user_error(run_cli("generate", "--config", path), str(path), "unknown key 'data.forget.promts'")


@pytest.mark.parametrize(
    "args, data, fragments",
    [
        (["--dtype", "fp17"], None, ["unknown dtype 'fp17'", "fp32"]),
        (["--role", "forgett"], None, ["unknown role 'forgett'"]),
        ([], {"forget": {"prompts": ["x"]}, "sampler": {"steps": "many"}}, ["bad value for 'data.sampler.steps'"]),
        ([], {"forget": {"prompts": ["x"], "folder": "f"}}, ["data.forget", "not both"]),
        (["--role", "related"], None, ["defines no 'related'"]),
    ],
)
def test_bad_values(run_cli, tmp_path, tiny_sd_dir, args, data, fragments):
    path = write_config(tmp_path, data or {"forget": {"prompts": ["x"]}}, tiny_sd_dir)
    assert_user_error(run_cli("generate", "--config", path, *args), *fragments)


def test_missing_config_file(run_cli, tmp_path):
    assert_user_error(run_cli("generate", "--config", tmp_path / "nope.yaml"), "config file not found")


# ---- data folders ----------------------------------------------------------------------------------------------------
def _user_folder_config(tmp_path: Path, model: Path) -> tuple[Path, Path]:
    user = tmp_path / "user"
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    write_imagefolder(user / "train", images, ["a dog", "a cat"])
    write_imagefolder(user / "test", images[:1], ["a bird"])
    return write_config(tmp_path, {"root": str(tmp_path / "data"), "irrelevant": {"folder": str(user)}}, model), user


def test_user_folder_is_accepted_and_cached(run_cli, tmp_path, tiny_sd_dir):
    config, user = _user_folder_config(tmp_path, tiny_sd_dir)
    result = run_cli("generate", "--config", config, "--cache", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "data" / "cache").glob("*.safetensors"))) == 2


def test_empty_data_folder(run_cli, tmp_path, tiny_sd_dir):
    config, user = _user_folder_config(tmp_path, tiny_sd_dir)
    for p in (user / "test").iterdir():
        p.unlink()
    assert_user_error(run_cli("generate", "--config", config), "data folder", "test is empty")


def test_corrupt_image(run_cli, tmp_path, tiny_sd_dir):
    config, user = _user_folder_config(tmp_path, tiny_sd_dir)
    image = user / "train" / "000001.png"
    image.write_bytes(image.read_bytes()[:60])  # truncated PNG
    assert_user_error(run_cli("generate", "--config", config, "--cache"), "cannot read image", str(image))
    assert not list((tmp_path / "data").glob("cache/*.safetensors"))


def test_missing_caption(run_cli, tmp_path, tiny_sd_dir):
    config, user = _user_folder_config(tmp_path, tiny_sd_dir)
    meta = user / "train" / METADATA_FILE
    meta.write_text('{"file_name": "000000.png", "text": "a dog"}\n{"file_name": "000001.png"}\n')
    assert_user_error(run_cli("generate", "--config", config), f"{meta} line 2", "000001.png has no caption")


def test_missing_metadata(run_cli, tmp_path, tiny_sd_dir):
    config, user = _user_folder_config(tmp_path, tiny_sd_dir)
    (user / "train" / METADATA_FILE).unlink()
    assert_user_error(run_cli("generate", "--config", config), "has no metadata.jsonl")


# ---- prompts and outputs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("prompts.csv", "text,seed\na dog,1\n", "has no 'prompt' column"),
        ("prompts.txt", "\n\n", "contains no prompts"),
        ("prompts.pdf", "%PDF", "unsupported type .pdf"),
        ("missing.txt", None, "prompt file not found"),
    ],
)
def test_bad_prompt_file(run_cli, tmp_path, tiny_sd_dir, good_output, name, content, fragment):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    before = snapshot(good_output)
    result = run_cli("generate", tiny_sd_dir, "--prompt-file", path, "--out", good_output, "--overwrite", *FAST)
    assert_user_error(result, fragment, str(path))
    assert snapshot(good_output) == before


def test_unwritable_output(run_cli, tmp_path, tiny_sd_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("I am a file, not a folder")
    result = run_cli("generate", tiny_sd_dir, "--prompts", "a dog", "--out", blocker / "sub" / "out", *FAST)
    assert_user_error(result, "cannot create folder", "a-file")
    result = run_cli("generate", tiny_sd_dir, "--prompts", "a dog", "--out", blocker, "--overwrite", *FAST)
    assert_user_error(result, "is a file, not a folder")
    assert blocker.read_text() == "I am a file, not a folder"


def test_existing_output_needs_overwrite(run_cli, tmp_path, tiny_sd_dir, good_output):
    before = snapshot(good_output)
    result = run_cli("generate", tiny_sd_dir, "--prompts", "a bird", "--out", good_output, *FAST)
    assert_user_error(result, "already exists", "--overwrite")
    assert snapshot(good_output) == before


def test_conflicting_arguments(run_cli, tmp_path, tiny_sd_dir):
    config = write_config(tmp_path, {"forget": {"prompts": ["x"]}}, tiny_sd_dir)
    assert_user_error(run_cli("generate", "--config", config, "--prompts", "a"), "not both")
    assert_user_error(run_cli("generate", tiny_sd_dir, "--out", tmp_path / "o"), "no prompts given")
    assert_user_error(run_cli("generate", tiny_sd_dir, "--prompts", "a"), "--out")


# ---- the installed console script ------------------------------------------------------------------------------------
def test_console_script_prints_one_line(tmp_path):
    exe = Path(sys.executable).with_name("metaunlearn")
    if not exe.exists():
        pytest.skip("metaunlearn console script not installed next to this Python")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(exe), "generate", "--config", str(bad)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}: malformed YAML (line 2, column 1): expected ',' or ']', but got '<stream end>'"]


def test_invalid_option_value_is_a_usage_error(run_cli, tiny_sd_dir, tmp_path):
    result = run_cli("generate", tiny_sd_dir, "--prompts", "a", "--out", tmp_path / "o", "--images-per-prompt", "0")
    assert result.exit_code == 2
    assert "Invalid value for '--images-per-prompt'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
