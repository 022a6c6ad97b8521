"""The attacker's own images on the embedded concept world: procedural renders, not samples of any model.

An attacker who wants a concept back finetunes on images they collected, which need not look like what the
released model (or the base model) draws. Here that is a fresh procedural render of each prompt's concept,
captioned with the prompt.
"""

from __future__ import annotations

from pathlib import Path

from metaunlearn.data.imagefolder import write_imagefolder
from metaunlearn.toyworld.world import concept_of_prompt, render, to_tensor

RENDER_SEED_OFFSET = 7919  # keeps attack renders apart from the detector's and the base model's training renders


def render_folder(prompts: list[str], folder: Path, *, images_per_prompt: int, seed: int = 0) -> Path:
    """``images_per_prompt`` renders of each prompt's concept (captioned with the prompt) as an image folder."""
    images, texts = [], []
    for i, prompt in enumerate(prompts):
        concept = concept_of_prompt(prompt)
        batch = to_tensor(render(concept.name, images_per_prompt, seed=RENDER_SEED_OFFSET + 1000 * seed + i))
        images.extend(batch)
        texts.extend([prompt] * images_per_prompt)
    extra = {"source": "render", "prompts": prompts, "images_per_prompt": images_per_prompt, "seed": seed}
    return write_imagefolder(folder, images, texts, extra)
