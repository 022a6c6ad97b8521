"""The command line as a shell user meets it: help that loads no heavy library, ``--version``, pointed messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import yaml

import metaunlearn

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "matplotlib", "numpy", "PIL", "torchmetrics",
         "nudenet", "onnxruntime", "safetensors")


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(metaunlearn.__file__).parents[1]),
                                                                       os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_importing_the_cli_imports_no_heavy_library():
    proc = _python(f"import json, sys; import metaunlearn.cli; "
                   f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_every_help_page_renders_without_heavy_imports():
    """``metaunlearn --help`` and ``--help`` of every command and subcommand, all in one fresh process."""
    code = f"""
import contextlib, io, json, sys
from metaunlearn import cli

def paths(command, prefix):
    yield prefix
    for name, sub in getattr(command, "commands", {{}}).items():
        yield from paths(sub, prefix + [name])

out = []
for argv in paths(cli.build_command(), []):
    sys.argv = ["metaunlearn", *argv, "--help"]
    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf):
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code
    out.append({{"argv": argv, "code": code, "usage": "Usage:" in buf.getvalue()}})
print(json.dumps({{"pages": out, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    pages = {" ".join(p["argv"]): p for p in result["pages"]}
    assert {"", "generate", "unlearn", "attack", "report", "run", "demo", "toy", "toy pretrain", "toy evaluate",
            "toy render"} <= set(pages)
    assert all(p["code"] in (0, None) and p["usage"] for p in pages.values()), pages
    assert result["heavy"] == []


def test_version(run_cli):
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"metaunlearn {metaunlearn.__version__}"
    assert metaunlearn.__version__ == version("metaunlearn")


def test_a_model_folder_without_unet_says_so(run_cli, tiny_sd_copy, tmp_path):
    shutil.rmtree(tiny_sd_copy / "unet")
    result = run_cli("generate", tiny_sd_copy, "--prompts", "a dog", "--out", tmp_path / "out", "--steps", "2",
                     "--quiet")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no unet/" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_attack_data_folder_says_not_found(run_cli, tiny_sd_dir, tmp_path):
    config = tmp_path / "attack.yaml"
    config.write_text(yaml.safe_dump({"attack": {"sets": {"hrm-m": {"data": "no-such-folder"}}, "lrs": [1e-3],
                                                 "snapshot_steps": [0, 1], "batch_size": 1}}))
    result = run_cli("attack", tiny_sd_dir, config, "--run-dir", tmp_path / "run", "--quiet", "--device", "cpu")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0] and "no-such-folder" in lines[0], lines


def test_toy_commands_answer_bad_input_in_one_line(run_cli, tmp_path):
    result = run_cli("toy", "render", "purple_blob", "--out", tmp_path / "png")
    assert result.exit_code == 2 and result.stderr.startswith("error: unknown concept 'purple_blob'"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "png").exists()
    result = run_cli("toy", "evaluate", "--assets", tmp_path / "no-assets")
    assert result.exit_code == 2 and result.stderr.startswith("error: toy model not found"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
