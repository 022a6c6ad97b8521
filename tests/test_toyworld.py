"""The embedded concept world: taxonomy, deterministic rendering, the shipped detector and toy model.

Sampling thresholds: the shipped model is required to draw >= 85% of samples as the prompt's concept on 32+
samples per prompt (see ``assets/toy/eval.json``). Here only 16 samples per prompt are drawn to stay fast, so the
threshold is relaxed to 12/16 = 75% to absorb sampling noise on that smaller draw (at a true rate of 85%,
fewer than 12 hits out of 16 has probability ~7%); sampling is seeded, so the result is deterministic.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from metaunlearn.toyworld import taxonomy  # noqa: E402
from metaunlearn.toyworld.assets import ASSET_DIR, detector_path, load_toy_detector, model_dir  # noqa: E402
from metaunlearn.toyworld.detector import ConceptDetector, detector_accuracy  # noqa: E402
from metaunlearn.toyworld.pretrain import MARKER_FILE, sample  # noqa: E402
from metaunlearn.toyworld.world import CONCEPTS, render, render_class, to_tensor  # noqa: E402

SAMPLES_PER_PROMPT = 16
RELAXED_THRESHOLD = 12 / 16


@pytest.fixture(scope="module")
def detector() -> ConceptDetector:
    return load_toy_detector()


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        str(model_dir()), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_taxonomy_has_the_roles_the_paper_needs() -> None:
    forget = taxonomy.concepts_for("forget")
    related = taxonomy.concepts_for("related")
    irrelevant = taxonomy.concepts_for("irrelevant")
    assert len(forget) == 1 and len(related) >= 2 and len(irrelevant) >= 4
    target = forget[0]
    assert len(target.heldout_paraphrases) >= 2
    for concept in related:
        assert concept.colour == target.colour or concept.shape == target.shape
    for concept in irrelevant:
        assert concept.colour != target.colour and concept.shape != target.shape
    # The forget concept's colour and shape each appear in at least two related concepts.
    assert sum(c.colour == target.colour for c in related) >= 2
    assert sum(c.shape == target.shape for c in related) >= 2
    unlearning_prompts = taxonomy.prompts_for("forget", include_paraphrases=True)
    assert not set(taxonomy.heldout_prompts()) & set(unlearning_prompts)
    assert set(taxonomy.heldout_prompts()) <= set(taxonomy.caption_corpus())
    assert all(c.name in taxonomy.CLASS_NAMES for c in CONCEPTS)


def test_rendering_is_deterministic_per_seed() -> None:
    a = render("red_triangle", 6, seed=3)
    b = render("red_triangle", 6, seed=3)
    c = render("red_triangle", 6, seed=4)
    assert a.shape == (6, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(render("red_circle", 6, seed=3), a)
    with pytest.raises(ValueError, match="Unknown concept"):
        render("purple_triangle", 1)


PRETRAIN_FINGERPRINT = """
import hashlib, json, torch
from metaunlearn.toyworld.pretrain import ToyModelConfig, train_model
torch.set_num_threads(1)
for exclude in ((), ("red_triangle",)):  # the shipped model's recipe and the retrain reference's
    pipe = train_model(ToyModelConfig(steps=2, batch_size=4, images_per_concept=4, exclude=exclude), seed=0)
    h = hashlib.sha1(json.dumps(pipe.tokenizer.get_vocab(), sort_keys=True).encode())
    for module in (pipe.text_encoder, pipe.unet):
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode()); h.update(tensor.numpy().tobytes())
    print(h.hexdigest())
"""


def test_pretraining_is_reproducible_across_processes() -> None:
    """Tokenizer ids, initialisation and training steps do not depend on the process (e.g. its hash seed), for the
    shipped model's recipe and the retrain reference's."""
    import subprocess
    import sys

    digests = {
        subprocess.run([sys.executable, "-c", PRETRAIN_FINGERPRINT], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
        for seed in (1, 2)
    }
    assert len(digests) == 1
    shipped, reference = next(iter(digests)).split()
    assert len(shipped) == len(reference) == 40 and shipped != reference


def test_an_excluded_concept_is_never_shown_to_the_retrain_reference() -> None:
    """``exclude`` drops every image of the concept (and so every caption of it) from pretraining; the other
    concepts keep all of theirs; an unknown name is a one-line error."""
    from metaunlearn.errors import UserError
    from metaunlearn.toyworld.pretrain import _without, render_training_set

    data = render_training_set(per_concept=3, seed=0)
    red_triangle = [c.name for c in CONCEPTS].index("red_triangle")
    kept = _without(data, ("red_triangle",))
    assert red_triangle not in kept.concept_index.tolist()
    assert len(kept.images) == len(data.images) - 3 == len(kept.concept_index)
    others = data.concept_index != red_triangle
    assert torch.equal(kept.images, data.images[others])
    assert _without(data, ()) is data  # the shipped model's training data (and random stream) are unchanged
    with pytest.raises(UserError, match="unknown concept"):
        _without(data, ("purple_blob",))


def test_shipped_detector_is_accurate_on_fresh_renders(detector: ConceptDetector) -> None:
    accuracy = detector_accuracy(detector, per_class=50, seed=424242)
    for concept in CONCEPTS:
        assert accuracy[concept.name] >= 0.98, (concept.name, accuracy[concept.name])
    assert min(accuracy.values()) >= 0.98


def test_detector_api_and_round_trip(detector: ConceptDetector, tmp_path) -> None:
    images = to_tensor(render_class("yellow_cross", 4, seed=1))
    probs = detector.probs(images)
    assert probs.shape == (4, len(detector.class_names))
    assert torch.allclose(probs.sum(dim=1), torch.ones(4), atol=1e-5)
    assert detector.features(images).shape == (4, detector.feature_dim)
    detector.save(tmp_path / "d.safetensors")
    reloaded = ConceptDetector.load(tmp_path / "d.safetensors")
    assert reloaded.class_names == detector.class_names
    assert torch.allclose(reloaded.probs(images), probs, atol=1e-6)


def test_shipped_assets_are_a_small_standard_pipeline(pipe) -> None:
    assert json.loads((model_dir() / MARKER_FILE).read_text())["pixel_space"] is True
    assert pipe.vae_scale_factor == 1
    assert pipe.unet.config.in_channels == 3 and pipe.unet.config.sample_size == 16
    files = [p for p in ASSET_DIR.rglob("*") if p.is_file()]
    assert detector_path().exists() and (ASSET_DIR / "eval.json").exists()
    assert sum(p.stat().st_size for p in files) <= 15 * 2**20


FORGET = taxonomy.concepts_for("forget")[0]
SAMPLED_PROMPTS = [
    FORGET.prompt,
    *FORGET.heldout_paraphrases,
    taxonomy.concepts_for("related")[0].prompt,
    taxonomy.concepts_for("irrelevant")[-1].prompt,
    "a blue square",  # the weakest concept of the shipped model (about 90% over 128 samples)
]


@pytest.fixture(scope="module")
def predictions(pipe, detector: ConceptDetector) -> dict[str, list[str]]:
    """Detector verdicts on SAMPLES_PER_PROMPT samples of every sampled prompt (one batched, seeded call)."""
    torch.manual_seed(0)
    images = sample(pipe, SAMPLED_PROMPTS, SAMPLES_PER_PROMPT, seed=11)
    assert images.shape == (SAMPLES_PER_PROMPT * len(SAMPLED_PROMPTS), 3, 16, 16)
    predicted = detector.predict(images)
    return {
        prompt: predicted[i * SAMPLES_PER_PROMPT : (i + 1) * SAMPLES_PER_PROMPT]
        for i, prompt in enumerate(SAMPLED_PROMPTS)
    }


@pytest.mark.parametrize("prompt", SAMPLED_PROMPTS)
def test_shipped_model_draws_the_prompted_concept(predictions: dict[str, list[str]], prompt: str) -> None:
    target = taxonomy.concept_of_prompt(prompt).name
    hits = sum(p == target for p in predictions[prompt])
    assert hits / SAMPLES_PER_PROMPT >= RELAXED_THRESHOLD, (prompt, predictions[prompt])


def test_the_retrain_reference_ships_and_never_learned_the_concept(detector: ConceptDetector) -> None:
    """The shipped retrain reference is the shipped recipe minus every red triangle (its eval.json says how it was
    made), loads with plain diffusers, and does not draw the concept it never saw."""
    from metaunlearn.toyworld.assets import RETRAIN_DIR, load_toy_pipeline

    made = json.loads((RETRAIN_DIR / "eval.json").read_text())
    shipped = json.loads((ASSET_DIR / "eval.json").read_text())
    assert made["command"] == shipped["command"] + " --exclude red_triangle"
    assert made["model_config"] == {**shipped["model_config"], "exclude": ["red_triangle"]}
    reference = load_toy_pipeline(RETRAIN_DIR)
    reference.set_progress_bar_config(disable=True)
    images = sample(reference, [FORGET.prompt, "a red circle"], SAMPLES_PER_PROMPT, seed=11)
    predicted = detector.predict(images)
    forget, related = predicted[:SAMPLES_PER_PROMPT], predicted[SAMPLES_PER_PROMPT:]
    assert sum(p == FORGET.name for p in forget) <= 2, forget
    assert sum(p == "red_circle" for p in related) / SAMPLES_PER_PROMPT >= RELAXED_THRESHOLD, related
