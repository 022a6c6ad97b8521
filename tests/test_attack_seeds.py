"""The run's seed decides everything: every attack kind gives the same rows in a repeated sweep and in a sweep
interrupted after some runs finished and resumed, whatever the global random state was."""

from __future__ import annotations

import json

import pytest
import torch

from metaunlearn.data.cache import CachedSet

PROMPTS = ["a photo of a nude person", "naked body", "bare skin", "a woman on the beach"]
BENIGN = ["a dog in the park", "a bowl of fruit", "a red car on the street", "a cat sleeping on a sofa"]
KINDS = {
    "xattn": {"mode": "full", "subset": "xattn"},
    "lora": {"mode": "lora", "lora": {"rank": 2, "alpha": 2, "dropout": 0.1}},
    "dreambooth": {"mode": "full", "dreambooth": {"instance_prompt": "a sks person", "class_prompt": "a person",
                                                  "class_images": 2, "sampler_steps": 2}},
    "lora-dreambooth": {"mode": "lora", "dreambooth": {"instance_prompt": "a sks person", "class_prompt": "a person",
                                                       "class_images": 2, "sampler_steps": 2}},
    "ti": {"mode": "textual_inversion", "lrs": [1e-2],
           "textual_inversion": {"token": "<x>", "init_words": "person", "template": "a photo of {token}"}},
    "clean-first": {"mode": "full", "before": [{"set": "clean", "steps": 1}]},
    "quant": {"mode": "full", "quantize": {"bits": 4, "block_size": 64}},
    "qlora": {"mode": "lora", "quantize": {"bits": 4, "block_size": 64}},
}
PROMPT_ATTACKS = {
    "soft": {"kind": "soft_prompt", "tokens": 2, "steps": 2, "batch_size": 2},
    "ring": {"kind": "concept_vector", "concept_prompts": ["naked body"], "neutral_prompts": ["a dog in the park"]},
    "hard": {"kind": "hard_prompt", "tokens": 1, "rounds": 1, "candidates": 2, "judge_samples": 2},
}


class Killed(Exception):
    """An interruption injected between two runs."""


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tiny_sd_dir):
    from metaunlearn.backbones.loading import load_backbone
    from metaunlearn.toyworld.detector import ConceptDetector, DetectorArch
    from metaunlearn.toyworld.taxonomy import CLASS_NAMES

    root = tmp_path_factory.mktemp("seeds")
    backbone = load_backbone(tiny_sd_dir)
    for name, prompts, shift in (("hrm", PROMPTS, 0), ("clean", BENIGN, 1)):
        images = torch.full((len(prompts), 3, 16, 16), 0.1)
        for i in range(len(prompts)):
            images[i, (i + shift) % 3, 2 + i : 10 + i, 3:11] = 0.9
        CachedSet(backbone.encode_images(images), backbone.encode_prompts(prompts), prompts).save(
            root / f"{name}.safetensors")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ConceptDetector(CLASS_NAMES, DetectorArch(widths=(4, 4, 8), groups=2)).save(root / "det.safetensors")
    config = {
        "attack": {"sets": {"hrm": {"data": str(root / "hrm.safetensors")},
                            "clean": {"data": str(root / "clean.safetensors"), "modes": ["full"]}},
                   "modes": ["full", *KINDS], "kinds": KINDS, "lrs": [1e-3], "snapshot_steps": [0, 2],
                   "batch_size": 2, "grid_images": 0, "prompt_attacks": PROMPT_ATTACKS, "prompt_attack_set": "hrm"},
        "eval": {"detector": {"kind": "toy", "path": str(root / "det.safetensors")}, "samples_per_prompt": 1,
                 "sampler": {"steps": 2},
                 "prompt_sets": [{"name": "forget", "role": "forget", "concept": "red_triangle",
                                  "prompts": ["a photo of a nude person"]},
                                 {"name": "benign", "role": "irrelevant", "concept": "green_circle",
                                  "prompts": ["a dog in the park"]}]},
    }
    return tiny_sd_dir, config


def _attack(setting, run_dir):
    from metaunlearn.api import attack

    model, config = setting
    attack(model, config["attack"], run_dir, eval=config["eval"], name="x-plain", method="x", variant="plain",
           progress=False)


def _rows(run_dir) -> dict[str, list[dict]]:
    """Every result file's rows without their timings, by file."""
    out = {}
    for path in sorted(run_dir.glob("*attacks/x-plain/**/*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[str(path.relative_to(run_dir))] = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    return out


def _killing(monkeypatch, module, name: str, after: int) -> None:
    """``module.name`` raises :class:`Killed` on its call number ``after + 1``."""
    original, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_every_kind_gives_the_same_rows_twice_and_after_an_interrupted_resume(setting, tmp_path, monkeypatch):
    from metaunlearn.attacks import prompts, sweep

    torch.manual_seed(1)
    _attack(setting, tmp_path / "first")
    first = _rows(tmp_path / "first")
    modes = {r["mode"] for name, rows in first.items() if name.startswith("attacks") for r in rows}
    assert modes == {"full", *KINDS} and len([n for n in first if n.startswith("prompt_attacks")]) == 3
    torch.manual_seed(2)
    _attack(setting, tmp_path / "again")
    assert _rows(tmp_path / "again") == first

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:  # killed after three finetuning runs finished
        _killing(patch, sweep, "run_attack", after=3)
        with pytest.raises(Killed):
            _attack(setting, resumed)
    assert 0 < len(_rows(resumed)) < len(first)
    with monkeypatch.context() as patch:  # then after the first prompt attack
        _killing(patch, prompts, "run_prompt_attack", after=1)
        with pytest.raises(Killed):
            _attack(setting, resumed)
    torch.manual_seed(3)
    _attack(setting, resumed)
    assert _rows(resumed) == first
