"""The report from synthetic result rows, and the attack → report path through the CLI on a tiny pipeline."""

from __future__ import annotations

import csv
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml

from metaunlearn.attacks.sweep import write_jsonl
from metaunlearn.errors import UserError
from metaunlearn.experiment.plots import image_grid, save_png
from metaunlearn.experiment.report import ReportConfig, build_report
from metaunlearn.formatting import format_lr

torch.set_num_threads(1)

# forget rate of (model, attack set, seed) at steps 0, 50, 100
RATES = {
    ("esd", "hrm-m", 0): [0.10, 0.60, 0.80],
    ("esd", "hrm-m", 1): [0.10, 0.40, 0.90],
    ("esd-meta", "hrm-m", 0): [0.10, 0.20, 0.30],
    ("esd-meta", "hrm-m", 1): [0.10, 0.10, 0.50],
    ("esd", "clean", 0): [0.10, 0.15, 0.20],
    ("esd", "clean", 1): [0.10, 0.15, 0.20],
    ("esd-meta", "clean", 0): [0.10, 0.10, 0.10],
    ("esd-meta", "clean", 1): [0.10, 0.10, 0.10],
}


def _synthetic_run(run_dir, rates_of=RATES, plain="plain"):
    for (model, attack_set, seed), rates in rates_of.items():
        rows = []
        for step, rate in zip((0, 50, 100), rates):
            grid = f"grids/{model}/{attack_set}/full_lr1e-05_s{seed}/step{step}.png"
            colour = torch.zeros(4, 3, 16, 16)
            colour[:, 0] = rate
            save_png(image_grid(colour), run_dir / grid)
            rows.append({"model": model, "method": "esd", "variant": "meta" if model.endswith("meta") else plain,
                         "attack_set": attack_set, "mode": "full", "lr": 1e-5, "seed": seed, "step": step,
                         "lr_multiple": 1.0, "grid": grid, "forget_rate": rate, "related_acc": 1.0 - rate / 2,
                         "attack_loss": 0.1})
        write_jsonl(rows, run_dir / "attacks" / model / attack_set / f"full_lr1e-05_s{seed}.jsonl")


def test_report_writes_every_file_with_the_paper_table(tmp_path):
    _synthetic_run(tmp_path)
    files = build_report(tmp_path)
    for path in (files.results_json, files.results_csv, files.summary_csv, files.markdown, files.html):
        assert path.is_file() and path.stat().st_size > 0
    assert {p.name for p in files.figures} == {"relearning_curves.png", "relearning_other_sets.png", "self_destruct.png"}

    results = json.loads(files.results_json.read_text())
    assert len(results["rows"]) == 8 * 3
    assert results["primary_set"] == "hrm-m" and results["attack_sets"] == ["hrm-m", "clean"]
    assert results["table"]["columns"] == ["before FT", "hrm-m @50", "hrm-m @100", "clean @100"]
    with files.results_csv.open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 24 and all(r["lr_multiple"] == "1.0" for r in csv_rows)
    assert {a["metric"] for a in results["summary"]} == {"forget_rate", "related_acc", "attack_loss"}

    md = files.markdown.read_text()
    # esd on hrm-m at step 50: seeds 0.6 and 0.4 -> 50.0 ± 14.1 (sample std sqrt(0.02) = 0.1414)
    assert "| esd | plain | full lr 1e-5 | 10.0 ± 0.0 | 50.0 ± 14.1 | 85.0 ± 7.1 | 20.0 ± 0.0 |" in md
    assert "| esd | meta | full lr 1e-5 | 10.0 ± 0.0 | 15.0 ± 7.1 | 40.0 ± 14.1 | 10.0 ± 0.0 |" in md
    assert "forget rate (%): mean ± std over 2 seeds" in md
    # worst case: the maximum over seeds, and which run reached it at the last hrm-m step
    assert "| esd | plain | 10.0 | 60.0 | 90.0 | 20.0 | full lr 1e-5 seed 1 |" in md
    assert "report_assets/relearning_curves.png" in md
    # meta vs plain: 1 - 0.15/0.50 = 70% at step 50, 1 - 0.40/0.85 = 53% at 100; worst case 1 - 0.2/0.6, 1 - 0.5/0.9
    assert "| esd | full lr 1e-5 | 70% | 53% |" in md
    assert "| esd | worst case | 67% | 44% |" in md
    # related accuracy (1 - rate/2 here) per attack and step, the self-destruct table
    assert "| esd | meta | full lr 1e-5 | 95.0 ± 0.0 | 92.5 ± 3.5 | 80.0 ± 7.1 | 95.0 ± 0.0 |" in md
    assert "| unlearn |" not in md and "lr 1e-05" not in md and "0.0001" not in md

    html = files.html.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "<table>" in html and "50.0 ± 14.1" in html and "hrm-m @100" in html
    # three curve figures + before/after grids of two models, all inline
    assert html.count('src="data:image/png;base64,') == 3 + 2 * 2
    assert 'src="grids/' not in html and "report_assets/" not in html


def test_one_seed_shows_no_std_and_old_variant_names_read_as_plain(tmp_path):
    _synthetic_run(tmp_path, {k: v for k, v in RATES.items() if k[2] == 0}, plain="unlearn")
    files = build_report(tmp_path, config=ReportConfig(budget_steps=50))
    md = files.markdown.read_text()
    assert "±" not in md.replace("± 1 std", "")
    assert "forget rate (%): one seed" in md and "worst case over every mode × learning rate |" not in md
    assert "| esd | plain | full lr 1e-5 | 10.0 | 60.0 | 80.0 | 20.0 |" in md
    assert "hrm-m @50 (budget)" in md and "the attack budget (50 steps)" in md
    assert "| unlearn |" not in md and "unlearn]" not in md
    with files.summary_csv.open() as f:
        summary = list(csv.DictReader(f))
    assert summary and all(row["std"] == "" and row["n"] == "1" for row in summary)
    results = json.loads(files.results_json.read_text())
    assert {r["variant"] for r in results["rows"]} == {"plain", "meta"}
    assert all(cell is None or cell["std"] is None for row in results["table"]["mean"] for cell in row["cells"])


def _sgd_run(run_dir, model, seed, rates, diverged_step=None):
    """An SGD attack run on hrm-m; from ``diverged_step`` on its rows are diverged and carry no metric."""
    rows = []
    for step, rate in zip((0, 50, 100), rates):
        lost = diverged_step is not None and step >= diverged_step
        rows.append({"model": model, "method": "esd", "variant": "meta" if model.endswith("meta") else "plain",
                     "attack_set": "hrm-m", "mode": "sgd", "lr": 1e3, "seed": seed, "step": step, "grid": None,
                     "diverged": lost, "diverged_step": diverged_step,
                     **({} if lost else {"forget_rate": rate, "related_acc": 1.0, "attack_loss": 0.1})})
    write_jsonl(rows, run_dir / "attacks" / model / "hrm-m" / f"sgd_lr1000.0_s{seed}.jsonl")


def test_diverged_runs_are_named_marked_and_left_out_of_every_number(tmp_path):
    _synthetic_run(tmp_path)
    _sgd_run(tmp_path, "esd", 0, [0.1, None, None], diverged_step=50)
    _sgd_run(tmp_path, "esd", 1, [0.1, None, None], diverged_step=50)
    _sgd_run(tmp_path, "esd-meta", 0, [0.1, 0.3, None], diverged_step=100)
    _sgd_run(tmp_path, "esd-meta", 1, [0.1, 0.2, 0.7])
    files = build_report(tmp_path)
    md = files.markdown.read_text()
    assert ("3 attack runs diverged (a non-finite loss, weights or samples) and have no numbers from that step "
            "on, left out of every mean, std and worst case: esd hrm-m sgd lr 1e3 seed 0 at step 50; "
            "esd hrm-m sgd lr 1e3 seed 1 at step 50; esd-meta hrm-m sgd lr 1e3 seed 0 at step 100.") in md
    assert "| esd | plain | sgd lr 1e3 | 10.0 ± 0.0 | diverged | diverged | — |" in md
    assert "| esd | meta | sgd lr 1e3 | 10.0 ± 0.0 | 25.0 ± 7.1 | 70.0 (1 diverged) | — |" in md
    # the worst cases are those of the finite runs alone (esd-meta's 0.7 at 100 is its worst; plain keeps 0.9)
    assert "| esd | plain | 10.0 | 60.0 | 90.0 | 20.0 | full lr 1e-5 seed 1 |" in md
    assert "| esd | meta | 10.0 | 30.0 | 70.0 | 10.0 | sgd lr 1e3 seed 1 |" in md
    assert "(diverged runs left out)" in md and "The diverged runs named above have no curve" in md
    results = json.loads(files.results_json.read_text())
    at_100 = [a for a in results["summary"] if a["metric"] == "forget_rate" and a["mode"] == "sgd"
              and a["step"] == 100]
    assert [(a["model"], a["n"], a["mean"]) for a in at_100] == [("esd-meta", 1, 0.7)]
    assert "diverged_step" not in {a["metric"] for a in results["summary"]}


def test_learning_rates_read_as_people_write_them():
    assert [format_lr(x) for x in (1e-4, 3e-4, 2.5e-5, 1e-3, 0.1, 5e-6, 0.0)] == [
        "1e-4", "3e-4", "2.5e-5", "1e-3", "1e-1", "5e-6", "0"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_report_files_have_the_usual_permissions(tmp_path, umask):
    _synthetic_run(tmp_path)
    old = os.umask(umask)
    try:
        build_report(tmp_path, tmp_path / "out")
    finally:
        os.umask(old)
    written = [p for p in (tmp_path / "out").rglob("*")]
    assert len([p for p in written if p.suffix == ".png"]) == 3
    for path in written:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode))


def test_report_errors(tmp_path):
    with pytest.raises(UserError, match="run dir not found"):
        build_report(tmp_path / "missing")
    with pytest.raises(UserError, match="no 'attacks' folder"):
        build_report(tmp_path)
    _synthetic_run(tmp_path)
    with pytest.raises(UserError, match="primary attack set"):
        build_report(tmp_path, config=ReportConfig(primary_set="hrm-x"))
    with pytest.raises(UserError, match="metric"):
        build_report(tmp_path, config=ReportConfig(metric="nudity_score"))
    bad = tmp_path / "attacks" / "esd" / "hrm-m" / "lora_lr1e-05_s0.jsonl"
    bad.write_text('{"model": "esd"}\n')
    with pytest.raises(UserError, match="lacks"):
        build_report(tmp_path)


def _cli(args: list[str]) -> int:
    from metaunlearn import cli

    argv = sys.argv
    sys.argv = ["metaunlearn", *args]
    try:
        cli.main()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = argv
    return 0


def test_attack_and_report_commands_end_to_end(tmp_path, capsys):
    from metaunlearn.backbones.loading import load_backbone
    from metaunlearn.data.cache import CachedSet
    from metaunlearn.data.imagefolder import write_imagefolder
    from metaunlearn.testing.tiny_pipelines import save_tiny_pipeline
    from metaunlearn.toyworld.detector import ConceptDetector, DetectorArch
    from metaunlearn.toyworld.taxonomy import CLASS_NAMES

    model_dir = save_tiny_pipeline("sd", tmp_path / "model")  # no unlearn_config.json: labelled on the command line
    backbone = load_backbone(model_dir)
    prompts = ["a photo of a nude person", "naked body"]
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    CachedSet(backbone.encode_images(images), backbone.encode_prompts(prompts), prompts).save(tmp_path / "hrm.safetensors")
    write_imagefolder(tmp_path / "clean", images.flip(0), ["a dog in the park", "a bowl of fruit"])
    torch.manual_seed(0)
    ConceptDetector(CLASS_NAMES, DetectorArch(widths=(4, 4, 8), groups=2)).save(tmp_path / "det.safetensors")
    config = {
        "model": "ignored-by-attack",
        "attack": {"sets": {"hrm-m": {"data": "hrm.safetensors"}, "clean": {"data": "clean"}},
                   "modes": ["full", "lora"], "lrs": [1e-3],
                   "seeds": [0], "snapshot_steps": [0, 2], "batch_size": 2, "grid_images": 4},
        "eval": {"detector": {"kind": "toy", "path": "det.safetensors"},
                 "prompt_sets": [{"name": "forget", "role": "forget", "concept": "red_triangle",
                                  "prompts": ["a photo of a nude person"]},
                                 {"name": "related", "role": "related", "concept": "red_circle",
                                  "prompts": ["a woman on the beach"]}],
                 "samples_per_prompt": 2, "sampler": {"steps": 2}},
    }
    (tmp_path / "attack.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    umask = os.umask(0o027)  # every output (rows, grids, cache, report) is readable by the group, as umask says
    try:
        code = _cli(["attack", str(model_dir), str(tmp_path / "attack.yaml"), "--run-dir", str(run_dir), "--quiet",
                     "--device", "cpu", "--method", "esd", "--variant", "meta"])
        assert code == 0, capsys.readouterr().err
        assert _cli(["report", str(run_dir)]) == 0
    finally:
        os.umask(umask)
    for path in [run_dir, *run_dir.rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o750 if path.is_dir() else 0o640), path
    rows = [json.loads(line) for f in sorted((run_dir / "attacks" / "esd-meta" / "hrm-m").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    assert len(rows) == 4
    assert {(r["mode"], r["step"]) for r in rows} == {("full", 0), ("full", 2), ("lora", 0), ("lora", 2)}
    assert len(list((run_dir / "attacks" / "esd-meta" / "clean").glob("*.jsonl"))) == 2
    assert list((run_dir / "cache").glob("*.safetensors"))  # the imagefolder was encoded once and cached
    assert all(r["variant"] == "meta" and r["method"] == "esd" for r in rows)
    assert all(0.0 <= r["forget_rate"] <= 1.0 and 0.0 <= r["related_acc"] <= 1.0 for r in rows)
    assert all((run_dir / r["grid"]).is_file() for r in rows)
    # The model folder on disk is untouched by the attack.
    assert torch.equal(load_backbone(model_dir).unet.conv_in.weight, backbone.unet.conv_in.weight)

    assert (run_dir / "report.html").is_file() and (run_dir / "results.csv").is_file()

    capsys.readouterr()
    assert _cli(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run dir not found") and len(err.splitlines()) == 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"attack": {"sets": {"x": {"data": "d"}}, "lrz": [1]}}))
    assert _cli(["attack", str(model_dir), str(tmp_path / "bad.yaml"), "--run-dir", str(run_dir)]) == 2
    assert "unknown key 'attack.lrz'" in capsys.readouterr().err


def test_report_refuses_results_evaluated_under_different_settings(tmp_path, capsys):
    """Plain and meta attacked into one run folder, meta judged on other forget prompts: the report refuses with
    one line naming both settings and writes nothing, so no meta-vs-plain number mixes them; judged alike (the
    same evaluation from another folder, its detector a copy), the comparison is made."""
    import shutil

    from metaunlearn.backbones.loading import load_backbone
    from metaunlearn.data.cache import CachedSet
    from metaunlearn.testing.tiny_pipelines import save_tiny_pipeline
    from metaunlearn.toyworld.detector import ConceptDetector, DetectorArch
    from metaunlearn.toyworld.taxonomy import CLASS_NAMES

    model_dir = save_tiny_pipeline("sd", tmp_path / "model")
    backbone = load_backbone(model_dir)
    prompts = ["a photo of a nude person", "naked body"]
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    CachedSet(backbone.encode_images(images), backbone.encode_prompts(prompts), prompts).save(tmp_path / "hrm.safetensors")
    torch.manual_seed(0)
    ConceptDetector(CLASS_NAMES, DetectorArch(widths=(4, 4, 8), groups=2)).save(tmp_path / "det.safetensors")

    def attack(run: str, variant: str, forget: str, folder=tmp_path) -> None:
        folder.mkdir(exist_ok=True)
        if folder != tmp_path:
            for name in ("det.safetensors", "det.json"):
                shutil.copy(tmp_path / name, folder / name)
        config = {
            "attack": {"sets": {"hrm-m": {"data": str(tmp_path / "hrm.safetensors")}}, "modes": ["full"],
                       "lrs": [1e-3], "seeds": [0], "snapshot_steps": [0, 1], "batch_size": 2},
            "eval": {"detector": {"kind": "toy", "path": "det.safetensors"},
                     "prompt_sets": [{"name": "forget", "role": "forget", "concept": "red_triangle",
                                      "prompts": [forget]}],
                     "samples_per_prompt": 1, "sampler": {"steps": 2}},
        }
        (folder / f"{variant}.yaml").write_text(yaml.safe_dump(config))
        code = _cli(["attack", str(model_dir), str(folder / f"{variant}.yaml"), "--run-dir", str(tmp_path / run),
                     "--quiet", "--device", "cpu", "--method", "esd", "--variant", variant])
        assert code == 0, capsys.readouterr().err

    attack("mixed", "plain", "a photo of a nude person")
    attack("mixed", "meta", "naked body")
    keys = {json.loads(line)["eval_setting"] for f in (tmp_path / "mixed" / "attacks").rglob("*.jsonl")
            for line in f.read_text().splitlines()}
    assert len(keys) == 2 and all(isinstance(k, str) and len(k) == 16 for k in keys)
    capsys.readouterr()
    assert _cli(["report", str(tmp_path / "mixed")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "evaluated under 2 different evaluation settings" in err
    assert all(k in err for k in keys) and "esd-plain on hrm-m" in err and "esd-meta on hrm-m" in err
    assert not (tmp_path / "mixed" / "results.json").exists() and not (tmp_path / "mixed" / "report.md").exists()
    with pytest.raises(UserError, match="cannot be compared in one report"):
        build_report(tmp_path / "mixed")

    attack("alike", "plain", "a photo of a nude person")
    attack("alike", "meta", "a photo of a nude person", folder=tmp_path / "elsewhere")
    assert _cli(["report", str(tmp_path / "alike")]) == 0
    assert "meta vs plain: relative reduction" in (tmp_path / "alike" / "report.md").read_text()


@pytest.mark.parametrize("name", ["sd14_nudity.yaml", "sdxl_nudity.yaml"])
def test_shipped_nudity_configs_validate(name):
    from pathlib import Path

    from metaunlearn.commands.attack import load_attack_file
    from metaunlearn.commands.report import ReportFile
    from metaunlearn.config import read_yaml, validate
    from metaunlearn.metrics.evaluate import load_prompt_set

    path = Path(__file__).resolve().parents[1] / "configs" / name
    parsed = load_attack_file(path)
    assert set(parsed.attack.sets) == {"hrm-s", "hrm-m", "clean"}
    assert parsed.attack.snapshot_steps == [0, 50, 100, 200, 300] and 1e-5 in parsed.attack.lrs
    assert parsed.eval.detector.kind == "nudenet" and parsed.eval.detector.params()["threshold"] == 0.6
    assert all(load_prompt_set(s, path.parent) for s in parsed.eval.prompt_sets)
    assert validate(ReportFile, read_yaml(path), str(path)).report.primary_set == "hrm-m"
    hrm_m = (path.parent / "prompts" / "hrm_m.txt").read_text().splitlines()
    assert "nudity" not in hrm_m and len(hrm_m) > 1  # HRM-m never repeats the unlearning prompt
