"""Every config check fails at load time: each validator of the config tree (the experiment config, the unlearn
config its template becomes, the method configs, every run an attack suite expands into) has a bad snippet here,
and ``metaunlearn run CONFIG --dry-run`` refuses each with one line and exit code 2, writing nothing. A validator
added without a case here fails :func:`test_every_validator_has_a_dry_run_case`."""

from __future__ import annotations

import copy
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from cli_checks import assert_user_error

TOY_MODEL = Path(__file__).resolve().parents[1] / "src" / "metaunlearn" / "assets" / "toy" / "model"
BASE = {
    "model": str(TOY_MODEL),
    "data": {"forget": {"prompts": ["a red triangle"], "images_per_prompt": 2},
             "related": {"prompts": ["a red circle"], "images_per_prompt": 2},
             "irrelevant": {"prompts": ["a green circle"], "images_per_prompt": 2}},
    "attack_data": {"hrm": {"prompts": ["a red triangle"], "images_per_prompt": 2, "source": "render"}},
    "unlearn": {"forget_prompts": ["a red triangle"], "steps": 2,
                "meta": {"batch_size": 1, "attacks": [{"steps": 1, "batch_size": 1}]}},
    "grid": {"methods": [{"name": "esd", "params": {"ddim_steps": 2}}], "variants": ["plain"], "include_base": False},
    "attack": {"sets": {"hrm": {}}, "snapshot_steps": [0, 4], "modes": ["full", "seq"],
               "kinds": {"seq": {"before": [{"set": "hrm", "steps": 2}]}}},
    "eval": {"detector": {"kind": "toy"}, "samples_per_prompt": 1,
             "prompt_sets": [{"name": "forget", "role": "forget", "concept": "red_triangle",
                              "prompts": ["a red triangle"]}]},
}

# (model, validator) -> (changes to BASE: dotted key -> value, None deletes the key), fragment of the one-line error
CASES: dict[tuple[str, str], tuple[dict, str]] = {
    ("ExperimentConfig", "_stages_fit"): ({"unlearn": None}, "'grid' needs an 'unlearn' section"),
    ("DataConfig", "_some_role"): ({"data": {"seed": 1}}, "define at least one of"),
    ("ConceptData", "_one_source"): ({"data.forget.folder": "somewhere"}, "not both"),
    ("AttackDataSpec", "_renderable"): ({"attack_data.hrm.prompts": ["a dog in the park"]}, "concept-world prompts"),
    ("GridConfig", "_unique"): ({"grid.methods": [{"name": "esd"}, {"name": "esd"}]}, "share a label"),
    ("AttackSuiteConfig", "_positive_lrs"): ({"attack.lrs": [-1e-4]}, "learning rates must be > 0"),
    ("AttackSuiteConfig", "_sorted_unique_steps"): ({"attack.snapshot_steps": [-1, 4]}, "snapshot steps must be >= 0"),
    ("AttackSuiteConfig", "_unique_lists"): ({"attack.modes": ["full", "nope"]}, "neither full, lora"),
    ("AttackSetData", "_sorted_unique_steps"): ({"attack.sets.hrm.snapshot_steps": [-2]},
                                                "snapshot steps must be >= 0"),
    ("AttackSetData", "_positive_lrs"): ({"attack.sets.hrm.lrs": [0.0]}, "learning rates must be > 0"),
    ("AttackKind", "_one_lr_source"): ({"attack.kinds.seq.lrs": [1e-4], "attack.kinds.seq.lr_multiples": [2.0],
                                        "attack.reference_lr": 1e-4}, "either 'lrs' or 'lr_multiples'"),
    ("TextualInversionSettings", "_has_token"): (
        {"attack.kinds.ti": {"mode": "textual_inversion", "textual_inversion": {"template": "a picture"}}},
        "must contain {token}"),
    ("PromptAttackSpec", "_pairs"): ({"attack.prompt_attacks": {"cv": {"kind": "concept_vector"}}},
                                     "concept_vector needs"),
    ("EvalConfig", "_names"): ({"eval.prompt_sets": [BASE["eval"]["prompt_sets"][0]] * 2}, "must be unique"),
    ("DetectorConfig", "_kind_needs"): ({"eval.detector": {"kind": "clip"}}, "needs 'path'"),
    ("PromptSetConfig", "_has_prompts"): ({"eval.prompt_sets": [{"name": "f", "role": "forget"}]},
                                          "needs 'prompts' or 'prompts_file'"),
    ("QualityConfig", "_fid_complete"): ({"eval.quality": {"fid_features": "toy"}}, "needs 'fid_reference'"),
    ("UnlearnConfig", "_consistent"): ({"unlearn.meta.order": "second_unrolled",
                                        "unlearn.gradient_checkpointing": True},
                                       "cannot be combined with gradient_checkpointing"),
    ("MethodSpec", "_known"): ({"unlearn.method": {"name": "nope"}}, "nope"),
    ("MethodSpec", "_resolve_params"): ({"grid.methods": [{"name": "esd", "params": {"etta": 1}}]}, "etta"),
    ("MetaConfig", "_second_order_support"): ({"unlearn.meta.order": "second",
                                               "unlearn.meta.attacks": [{"steps": 1, "radius": 0.1}]}, "radius"),
    ("AttackConfig", "_ordered_range"): ({"unlearn.meta.attacks": [{"lr_range": [1e-3, 1e-5]}]}, "0 < min <= max"),
    ("AttackSpec", "_sorted_unique_steps"): ({"attack.snapshot_steps": [0, -4]}, "snapshot steps must be >= 0"),
    ("AttackSpec", "_stages_fit"): ({"attack.kinds.seq.before": [{"set": "hrm", "steps": 4}]},
                                    "attack set 'hrm', kind 'seq': the 'before' stages take every step"),
}


def config_models() -> list[type[BaseModel]]:
    """Every pydantic model reachable through the fields of the config roots: the experiment config, the unlearn
    config its ``unlearn`` template becomes, one attack run of a suite, and each method's parameters."""
    from metaunlearn.attacks.run_spec import AttackSpec
    from metaunlearn.experiment.config import ExperimentConfig
    from metaunlearn.methods import METHODS, get_method
    from metaunlearn.unlearn_config import UnlearnConfig

    seen: dict[type[BaseModel], None] = {}
    todo: list = [ExperimentConfig, UnlearnConfig, AttackSpec, *(get_method(m).Config for m in METHODS)]
    while todo:
        t = todo.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            if t in seen:
                continue
            seen[t] = None
            todo += [f.annotation for f in t.model_fields.values()]
        todo += typing.get_args(t)
    return list(seen)


def validators() -> set[tuple[str, str]]:
    out = set()
    for model in config_models():
        decorators = model.__pydantic_decorators__
        out |= {(model.__name__, name) for name in [*decorators.field_validators, *decorators.model_validators]}
    return out


def test_every_validator_has_a_dry_run_case():
    found = validators()
    assert ("AttackSpec", "_stages_fit") in found and ("MetaConfig", "_second_order_support") in found
    assert found == set(CASES), (sorted(found - set(CASES)), sorted(set(CASES) - found))


def changed(changes: dict) -> dict:
    doc = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = doc
        for key in parents:
            node = node[key]
        if value is None:
            node.pop(last)
        else:
            node[last] = copy.deepcopy(value)
    return doc


def test_the_base_config_passes_the_dry_run(run_cli, tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump({**BASE, "run_dir": str(tmp_path / "run")}))
    result = run_cli("run", path, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", sorted(CASES), ids=lambda c: ".".join(c))
def test_dry_run_refuses_each_validators_bad_snippet(run_cli, tmp_path, case):
    changes, fragment = CASES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**changed(changes), "run_dir": str(tmp_path / "run")}))
    assert_user_error(run_cli("run", path, "--dry-run"), fragment)
    assert not (tmp_path / "run").exists()
