"""The Python API: the README's example runs as written; ``import metaunlearn`` stays light; pipelines in memory."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- api-example.*?-->\s*```python\n(.*?)```\s*<!-- /api-example -->", text, re.S)
    assert match, "README lost its Python API example"
    return match.group(1)


def test_readme_example_runs_and_prints_what_the_readme_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), "README.md", "exec"), {"__name__": "__readme__"})
    printed = out.getvalue().splitlines()
    shown = re.search(r"It prints \(measured here, CPU\):\n\n((?:    .*\n)+)", README.read_text()).group(1)
    assert printed == [line[4:] for line in shown.splitlines()]  # the README shows the real output
    assert (tmp_path / "nb" / "uce-plain" / "model" / "unlearn_config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "nb" / "run" / "attacks" / "uce-plain" / "hrm-m").iterdir()) == [
        "full_lr0.0001_s0.jsonl"]


def test_import_is_light_and_the_functions_survive_submodule_imports():
    code = ("import sys, metaunlearn; assert 'torch' not in sys.modules, 'torch imported';"
            "import metaunlearn.unlearn; import metaunlearn.api as api;"
            "assert callable(metaunlearn.unlearn) and metaunlearn.attack is api.attack;"
            "assert metaunlearn.evaluate is api.evaluate")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": ":".join(sys.path)})


def test_attack_and_evaluate_take_pipelines_in_memory_and_rows_are_plain(tmp_path):
    import metaunlearn
    from metaunlearn.testing.tiny_pipelines import build_tiny_sd

    pipe = build_tiny_sd(0)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    evaluation = {"detector": {"kind": "toy"}, "samples_per_prompt": 2, "sampler": {"steps": 2, "guidance": 2.0},
                  "prompt_sets": [{"name": "forget", "role": "forget", "concept": "red_triangle",
                                   "prompts": ["a red triangle"]}]}
    data = metaunlearn.generate(pipe, ["a red triangle"], tmp_path / "data", images_per_prompt=4,
                                sampler={"steps": 2, "batch_size": 4}, progress=False)
    metrics = metaunlearn.evaluate(pipe, evaluation).metrics
    assert {"rate/forget", "forget_rate"} <= set(metrics)
    result = metaunlearn.attack(pipe, {"sets": {"s": {"data": str(data)}}, "snapshot_steps": [0, 1],
                                       "batch_size": 2}, tmp_path / "run", eval=evaluation, progress=False)
    assert [r["step"] for r in result.rows] == [0, 1]
    assert all(isinstance(v, (str, int, float, type(None))) for r in result.rows for v in r.values())
    assert result.rows[0]["forget_rate"] == metrics["forget_rate"]  # step 0 is the unattacked model
    assert (result.name, result.variant) == ("base", "base")
    assert all((before[k] == v).all() for k, v in pipe.unet.state_dict().items())  # the attack left it unchanged
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pandas"):
            result.to_pandas()
    else:
        assert len(result.to_pandas()) == 2
