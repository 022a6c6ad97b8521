"""Relearning against a reference model that never saw the concept, and the attacker's payoff."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from metaunlearn.attacks.payoff import PayoffConfig, payoff_summary, run_payoffs
from metaunlearn.attacks.reference import against_reference, auc_until, mean_interval, steps_to, worst_excess


def _rows(model: str, variant: str, curve: dict[int, float], *, seed: int = 0, lr: float = 1e-4, mode: str = "full",
          related: dict[int, float] | None = None, fid: dict[int, float] | None = None) -> list[dict]:
    out = []
    for step, rate in curve.items():
        row = {"model": model, "method": variant, "variant": variant, "attack_set": "hrm", "mode": mode, "lr": lr,
               "seed": seed, "step": step, "forget_rate": rate}
        if related is not None:
            row["related_acc"] = related[step]
        if fid is not None:
            row["fid"] = fid[step]
        out.append(row)
    return out


def test_curve_helpers_by_hand():
    steps, values = [0, 25, 100], [0.0, 0.5, 1.0]
    assert auc_until(steps, values, 25) == pytest.approx(0.25)  # mean of a ramp 0 -> 0.5
    assert auc_until(steps, values, 10) == pytest.approx(0.1)  # cut between snapshots, interpolated at 10
    assert auc_until(steps, values, None) == pytest.approx((25 * 0.25 + 75 * 0.75) / 100)
    assert steps_to(steps, values, 0.5) == 25
    assert steps_to(steps, values, 0.75) == pytest.approx(62.5)
    assert steps_to(steps, [0.0, 0.2, 0.4], 0.5) is None
    assert steps_to(steps, [0.6, 0.2, 0.4], 0.5) == 0
    mean, half = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert mean_interval([5.0]) == (5.0, None)


def test_a_model_against_itself_has_no_excess_and_a_known_gap_is_measured():
    ref = _rows("retrain", "reference", {0: 0.0, 25: 0.5, 100: 1.0})
    same = _rows("twin", "plain", {0: 0.0, 25: 0.5, 100: 1.0})
    faster = _rows("uce-meta", "meta", {0: 0.0, 25: 1.0, 100: 1.0})
    records = {r["model"]: r for r in against_reference(ref + same + faster, ["retrain"], budget=25)}
    assert set(records) == {"twin", "uce-meta"}  # the reference is not compared with itself
    twin = records["twin"]
    assert twin["excess_budget"] == 0 and twin["excess_all"] == 0 and twin["steps_ratio"] == 1
    gap = records["uce-meta"]
    assert gap["excess_budget"] == pytest.approx(100 * (0.5 - 0.25))  # points over 0..25
    assert gap["excess_all"] == pytest.approx(100 * ((25 * 0.5 + 75) / 100 - (25 * 0.25 + 75 * 0.75) / 100))
    assert gap["steps_to"]["mean"] == 12.5 and gap["reference_steps_to"]["mean"] == 25
    assert gap["steps_ratio"] == 0.5 and gap["excess_budget_ci"] is None  # one seed: no interval
    worst = worst_excess(records.values())
    assert [w["model"] for w in worst] == ["twin", "uce-meta"]
    assert worst[1]["worst_run"] == {"model": "uce-meta", "attack_set": "hrm", "mode": "full", "lr": 1e-4, "seed": 0}


def test_runs_are_paired_by_seed_with_an_interval():
    rows = []
    for seed, (mine, theirs) in enumerate([(0.6, 0.5), (0.9, 0.5), (0.3, 0.5)]):
        rows += _rows("m", "meta", {0: 0.0, 10: mine}, seed=seed)
        rows += _rows("ref", "reference", {0: 0.0, 10: theirs}, seed=seed)
    rows += _rows("ref", "reference", {0: 0.0, 10: 1.0}, seed=7)  # unpaired seeds of the reference are not used
    (record,) = against_reference(rows, ["ref"])
    diffs = [100 * (m - 0.5) / 2 for m in (0.6, 0.9, 0.3)]
    assert record["seeds"] == [0, 1, 2]
    assert record["excess_all"] == pytest.approx(sum(diffs) / 3)
    assert record["excess_all_ci"] == pytest.approx(mean_interval(diffs)[1])
    assert record["steps_to"]["mean"] is None and record["steps_to"]["reached"] == 2  # seed 2 never reaches 50%


def test_the_payoff_thresholds_apply_as_stated():
    cfg = PayoffConfig(forget_rate=0.5, related_ratio=0.8, fd_ratio=2.0)
    released = {"related": 1.0, "fid": 10.0}
    cases = {  # (forget at step 10, related there, fid there) -> succeeded
        "usable": ((0.5, 0.8, 20.0), True),  # every threshold met exactly
        "broken-related": ((1.0, 0.79, 10.0), False),
        "broken-fd": ((1.0, 1.0, 20.1), False),
        "not-back": ((0.49, 1.0, 10.0), False),
    }
    rows = []
    for model, ((forget, related, fid), _) in cases.items():
        rows += _rows(model, "meta", {0: 0.0, 10: forget}, related={0: released["related"], 10: related},
                      fid={0: released["fid"], 10: fid})
    runs = {r["model"]: r for r in run_payoffs(rows, cfg)}
    assert {m: runs[m]["succeeded"] for m in cases} == {m: ok for m, (_, ok) in cases.items()}
    assert runs["broken-related"]["worst_usable"] is None  # no usable snapshot after step 0
    summary = {s["model"]: s for s in payoff_summary(rows, cfg)}
    assert summary["usable"]["share"] == 1 and summary["usable"]["worst_usable"] == 0.5
    assert summary["not-back"]["share"] == 0 and summary["not-back"]["worst_usable"] == 0.49
    looser = {s["model"]: s for s in payoff_summary(rows, PayoffConfig(related_ratio=0.7, fd_ratio=3.0))}
    assert looser["broken-related"]["share"] == 1 and looser["broken-fd"]["share"] == 1
    diverged = _rows("nan", "meta", {0: 0.0, 10: 1.0}, related={0: 1.0, 10: float("nan")})
    assert run_payoffs(diverged, cfg)[0]["succeeded"] is False  # a missing metric is never usable


EVAL = {"detector": {"kind": "toy"}, "samples_per_prompt": 2, "sampler": {"steps": 2, "guidance": 2.0},
        "prompt_sets": [{"name": "forget", "role": "forget", "concept": "red_triangle", "prompts": ["a red triangle"]},
                        {"name": "related", "role": "related", "concept": "red_circle", "prompts": ["a red circle"]}]}


@pytest.mark.parametrize("world", ["tiny-sd", "toy"])
def test_api_attacks_a_reference_alike_and_a_model_against_itself_has_zero_excess(world, tiny_sd_copy, tmp_path):
    import metaunlearn
    from metaunlearn.experiment.report import ReportConfig, build_report

    if world == "toy":  # the shipped toy model: it draws the concept, so the curves are not trivially zero
        tiny_sd_copy = tmp_path / "toy"
        shutil.copytree(metaunlearn.toy_model(), tiny_sd_copy)
    data = metaunlearn.generate(tiny_sd_copy, ["a red triangle"], tmp_path / "data", images_per_prompt=4,
                                sampler={"steps": 2, "batch_size": 4}, progress=False)
    suite = {"sets": {"s": {"data": str(data)}}, "snapshot_steps": [0, 1, 2], "batch_size": 2,
             "lrs": [1e-4, 1e-3], "seeds": [0, 1]}
    twin = tmp_path / "twin"
    shutil.copytree(tiny_sd_copy, twin)
    result = metaunlearn.attack(tiny_sd_copy, suite, tmp_path / "run", eval=EVAL, progress=False,
                                references=[{"name": "retrain", "path": twin}])
    (ref,) = result.references
    assert (ref.name, ref.variant) == ("retrain", "reference")
    strip = ("model", "method", "variant", "model_path", "model_fingerprint", "grid")
    assert [{k: v for k, v in r.items() if k not in strip} for r in ref.rows] == \
        [{k: v for k, v in r.items() if k not in strip} for r in result.rows]  # the identical sweep
    records = metaunlearn.against_reference(tmp_path / "run", budget=1)
    assert len(records) == 2 and all(r["excess_budget"] == 0 and r["excess_all"] == 0 for r in records)
    if world == "toy":
        assert any(r["forget_rate"] > 0 for r in result.rows)
    assert all(r["seeds"] == [0, 1] for r in records)
    files = build_report(tmp_path / "run", config=ReportConfig(budget_steps=1))
    text = files.markdown.read_text()
    assert "Against a model that never saw the concept" in text and "The attacker's payoff" in text
    saved = json.loads(files.results_json.read_text())
    assert len(saved["against_reference"]) == 2 and {p["model"] for p in saved["payoff"]} == {"base", "retrain"}


def test_experiment_references_are_attacked_like_every_model(tiny_sd_copy, tmp_path):
    import yaml

    from metaunlearn.experiment.runner import run_experiment

    cfg = {"model": str(tiny_sd_copy), "references": [{"name": "retrain", "path": str(tiny_sd_copy)}],
           "attack_data": {"s": {"prompts": ["a red triangle"], "images_per_prompt": 2,
                                 "sampler": {"steps": 2, "batch_size": 2}}},
           "attack": {"sets": {"s": {}}, "snapshot_steps": [0, 1], "batch_size": 2},
           "eval": EVAL, "report": {"budget_steps": 1}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_experiment(path, run_dir=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "attacks" / "retrain" / "s").is_dir()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(r["model"], r["reference"]) for r in saved["against_reference"]] == [("base", "retrain")]
    assert saved["against_reference"][0]["excess_all"] == 0


def test_reference_names_must_be_unique_and_need_attacks(tmp_path):
    from metaunlearn.config import validate
    from metaunlearn.errors import UserError
    from metaunlearn.experiment.config import ExperimentConfig

    with pytest.raises(UserError, match="its own name"):
        validate(ExperimentConfig, {"model": "m", "references": [{"name": "base", "path": "r"}],
                                    "attack": {"sets": {"s": {"data": "d"}}}}, "cfg")
    with pytest.raises(UserError, match="need an 'attack' section"):
        validate(ExperimentConfig, {"model": "m", "references": [{"name": "r", "path": "r"}]}, "cfg")


def test_attack_command_takes_references_and_prints_the_excess(run_cli, tiny_sd_dir, tiny_sd_copy, tmp_path):
    import yaml

    import metaunlearn

    data = metaunlearn.generate(tiny_sd_dir, ["a red triangle"], tmp_path / "data", images_per_prompt=2,
                                sampler={"steps": 2, "batch_size": 2}, progress=False)
    config = tmp_path / "attack.yaml"
    config.write_text(yaml.safe_dump({"attack": {"sets": {"s": {"data": str(data)}}, "snapshot_steps": [0, 1],
                                                 "batch_size": 2}, "eval": EVAL}))
    result = run_cli("attack", tiny_sd_dir, config, "--run-dir", tmp_path / "run", "--quiet", "--device", "cpu",
                     "--reference", tiny_sd_copy)
    assert result.exit_code == 0, result.stderr
    assert "never saw the concept" in result.stdout and (tmp_path / "run" / "attacks" / tiny_sd_copy.name).is_dir()
    missing = run_cli("attack", tiny_sd_dir, config, "--run-dir", tmp_path / "run", "--quiet", "--device", "cpu",
                      "--reference", tmp_path / "nowhere")
    assert missing.exit_code == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "reference model not found" in missing.stderr and not (tmp_path / "run" / "attacks" / "nowhere").exists()


def test_the_equal_damage_control_is_built_as_plain_and_attacked_in_its_own_role(tiny_sd_dir, tmp_path):
    import yaml
    from test_schedule import _grid

    from metaunlearn.experiment.runner import run_experiment

    path = _grid(tiny_sd_dir, tmp_path)
    cfg = yaml.safe_load(path.read_text())
    (uce,) = cfg["grid"]["methods"]
    uce["control"] = {"params": {"erase_scale": 3.0 * float(uce.get("params", {}).get("erase_scale", 1.0))}}
    cfg["references"] = [{"name": "retrain", "path": str(tiny_sd_dir)}]
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    run_experiment(path, run_dir=run, progress=False)
    record = json.loads((run / "models" / "uce-control" / "model" / "unlearn_config.json").read_text())
    assert record["variant"] == "plain"  # the folder says what made it; the results name its role
    assert record["config"]["method"]["params"]["erase_scale"] == uce["control"]["params"]["erase_scale"]
    saved = json.loads((run / "results.json").read_text())
    variants = {(r["model"], r["variant"]) for r in saved["rows"]}
    assert {("uce-control", "control"), ("uce-plain", "plain"), ("uce-meta", "meta"), ("retrain", "reference")} \
        <= variants
    report = (run / "report.md").read_text()
    assert "meta vs control" in report and "meta vs plain" in report
    assert "The equal-damage control: benign quality before any attack" in report
    assert {r["model"] for r in saved["against_reference"]} == {"uce-plain", "uce-control", "uce-meta"}


def test_a_results_page_is_written_from_the_run_with_its_provenance(tmp_path, run_cli):
    from metaunlearn.attacks.sweep import write_jsonl
    from metaunlearn.experiment import provenance

    run = tmp_path / "run"
    for model, variant, curve in (("retrain", "reference", {0: 0.0, 25: 0.5}), ("uce-meta", "meta", {0: 0.0, 25: 1.0})):
        write_jsonl(_rows(model, variant, curve, related={0: 1.0, 25: 1.0}), run / "attacks" / model / "hrm" / "r.jsonl")
    entry = provenance.record(run, "metaunlearn demo --seeds 3")
    result = run_cli("report", run, "--page", tmp_path / "docs" / "results.md")
    assert result.exit_code == 0, result.stderr
    page = (tmp_path / "docs" / "results.md").read_text()
    assert "`metaunlearn demo --seeds 3`" in page and entry["date"] in page
    assert (entry["commit"] or "an unknown commit")[:10] in page
    assert "| meta | meta | uce-meta | retrain | hrm | full lr 1e-4 | +25.0 |" in page
    assert "![" not in page and str(tmp_path) not in page  # tables only, no machine paths


def test_runs_under_other_seeds_are_never_compared():
    rows = _rows("m", "meta", {0: 0.0, 10: 1.0}, seed=1) + _rows("ref", "reference", {0: 0.0, 10: 0.0}, seed=0)
    assert against_reference(rows, ["ref"]) == []
