"""The shipped real-user configs (SD-1.4 and SDXL nudity) run end to end with tiny pipelines in place of real models.

Only sizes shrink (steps, images, samples) and local paths are swapped for tiny stand-ins; every section, method,
variant, attack set, attack mode and metric of the shipped file stays as the user would run it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from metaunlearn.testing.tiny_pipelines import save_tiny_clip

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _shrink(cfg: dict, model_dir: Path, tmp: Path, clip_dir: Path) -> dict:
    cfg["model"] = str(model_dir)
    cfg["run_dir"] = "run"  # relative: resolved against the config file's folder
    data = cfg["data"]
    data.pop("root", None)  # unset: the run folder's data/
    data["sampler"] = {"steps": 2, "guidance": 3.0, "batch_size": 8}
    for role in ("forget", "related", "irrelevant"):
        spec = data[role]
        spec["images_per_prompt"] = 2
        if "prompt_file" in spec:
            spec["prompt_file"] = str(CONFIGS / spec["prompt_file"])
    unlearn = cfg["unlearn"]
    unlearn.update(steps=2, mixed_precision="no", device="cpu", checkpoint_every=0)
    unlearn.pop("out", None)
    unlearn["meta"]["attacks"] = [{**a, "steps": 1, "batch_size": 2} for a in unlearn["meta"]["attacks"]]
    for method in cfg["grid"]["methods"]:
        method["steps"] = 2
        if method["name"] in ("esd", "sdd"):
            method["params"]["ddim_steps"] = 4
    attack = cfg["attack"]
    cfg["attack_data"] = {}
    prompt_files = {"hrm-s": "hrm_s.txt", "hrm-m": "hrm_m.txt", "clean": "clean.txt"}
    for name in attack["sets"]:
        prompts = (CONFIGS / "prompts" / prompt_files[name]).read_text().split("\n")
        cfg["attack_data"][name] = {"prompts": [p for p in prompts if p.strip()][:2], "images_per_prompt": 1}
        attack["sets"][name].pop("data")
    attack.update(snapshot_steps=[0, 2], seeds=[0], lrs=attack["lrs"][:1], batch_size=2, grid_images=2)
    ev = cfg["eval"]
    for s in ev["prompt_sets"]:
        s["prompts_file"] = str(CONFIGS / s["prompts_file"])
        s["limit"] = 2
    ev["sampler"].update(steps=2, batch_size=8)
    reference = tmp / "reference"
    reference.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (40 * i, 90, 200 - 30 * i)).save(reference / f"{i}.png")
    ev["quality"].update(clip_score_path=str(clip_dir), fid_features_path=str(clip_dir), fid_reference=str(reference))
    return cfg


@pytest.mark.parametrize("name,fixture", [("sd14_nudity.yaml", "tiny_sd_dir"), ("sdxl_nudity.yaml", "tiny_sdxl_dir")])
def test_shipped_config_runs_with_tiny_pipelines(name, fixture, request, tmp_path, run_cli):
    model_dir = request.getfixturevalue(fixture)
    shipped = yaml.safe_load((CONFIGS / name).read_text())
    methods = {m["name"] for m in shipped["grid"]["methods"]}
    assert methods == {"esd", "sdd", "uce", "rece"}
    cfg = _shrink(shipped, model_dir, tmp_path, save_tiny_clip(tmp_path / "clip"))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))

    result = run_cli("run", path, "-q")
    assert result.exit_code == 0, result.stderr

    run = tmp_path / "run"
    rows = json.loads((run / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    models = {r["model"] for r in rows}
    expected = {f"{m}-{v}" for m in methods for v in ("plain", "meta")}
    assert expected <= models
    assert {r["attack_set"] for r in rows} == {"hrm-s", "hrm-m", "clean"}
    assert {r["mode"] for r in rows} == set(shipped["attack"]["modes"])
    assert all("forget_rate" in r and "clip_score" in r for r in rows)
    for model in expected:
        assert (run / "models" / model / "model" / "model_index.json").is_file()
    html = (run / "report.html").read_text()
    assert "<table" in html and "data:image/png;base64," in html

    again = run_cli("run", path, "-q")  # every stage is done: nothing is recomputed
    assert again.exit_code == 0, again.stderr
    assert "skip" in again.stdout and "stage esd" not in again.stdout


def test_grid_seeds_run_in_parallel_worker_processes(tiny_sd_dir, tmp_path, run_cli):
    """Two grid seeds, their stages spread over two worker processes: every model per seed, rows for both, one report."""
    shipped = yaml.safe_load((CONFIGS / "sd14_nudity.yaml").read_text())
    cfg = _shrink(shipped, tiny_sd_dir, tmp_path, save_tiny_clip(tmp_path / "clip"))
    cfg["grid"]["methods"] = [m for m in cfg["grid"]["methods"] if m["name"] == "uce"]
    cfg["grid"].update(seeds=[0, 1], include_base=False)
    cfg["attack"]["modes"] = ["full"]
    cfg["eval"]["quality"] = {}
    path = tmp_path / "replicates.yaml"
    path.write_text(yaml.safe_dump(cfg))

    result = run_cli("run", path, "-q", "--jobs", "2")
    assert result.exit_code == 0, result.stderr
    run = tmp_path / "run"
    for key in ("uce-plain", "uce-meta", "uce-plain.s1", "uce-meta.s1"):
        assert (run / "models" / key / "model" / "model_index.json").is_file()
        assert json.loads((run / "stages" / f"attack-{key}.json").read_text())["state"] == "done"
    rows = json.loads((run / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert {(r["model"], r["seed"]) for r in rows} >= {("uce-meta", 0), ("uce-meta", 1), ("uce-plain", 1)}
    assert (run / "report.html").is_file()
