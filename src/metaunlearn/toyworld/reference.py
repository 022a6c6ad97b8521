"""Reference images of the toy world's benign concepts for the Fréchet distance: clean procedural renders.

``src/metaunlearn/assets/toy/reference/`` ships :func:`write_reference` 's output (16 renders of each related and
irrelevant concept); a test checks the shipped files equal a fresh render, so they are reproducible.
"""

from __future__ import annotations

from pathlib import Path

REFERENCE_PER_CONCEPT = 16
REFERENCE_SEED = 7


def write_reference(folder: str | Path, per_concept: int = REFERENCE_PER_CONCEPT, seed: int = REFERENCE_SEED) -> Path:
    """Write ``per_concept`` PNG renders of every related and irrelevant concept into ``folder``."""
    from PIL import Image

    from metaunlearn.toyworld.taxonomy import concepts_for
    from metaunlearn.toyworld.world import render

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for concept in concepts_for("related") + concepts_for("irrelevant"):
        for i, image in enumerate(render(concept.name, per_concept, seed)):
            Image.fromarray(image).save(folder / f"{concept.name}_{i:02d}.png", optimize=False)
    return folder
