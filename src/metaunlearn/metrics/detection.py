"""The concept-detector interface every evaluation and every detector goes through.

A detector answers, for a batch of images ``[N,3,H,W]`` in ``[0,1]`` and a concept it knows:

* ``probabilities(images, concept)`` — per-image probability (or confidence) that the image shows the concept;
* ``detects(images, concept)`` — per-image decision (the detector's own rule: threshold or arg-max).

The *rate* of a concept over a set of samples is the fraction of images in which it is detected: the forget rate
(the paper's "nudity rate") on forget prompts, and the accuracy of related / irrelevant concepts on their prompts
(a self-destructed model draws its related concepts badly after an attack, so their accuracy falls).

A sample with a NaN or infinite pixel (a diverged model's) shows no concept at all, not even ``none``:
:func:`detects_finite` decides so for every detector, and the evaluation counts such samples apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from metaunlearn.errors import UserError


@runtime_checkable
class ConceptDetector(Protocol):
    """Decides whether images show a concept."""

    name: str

    @property
    def concepts(self) -> Sequence[str]:
        """The concept names this detector can be asked about."""

    def probabilities(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        """Per-image probability ``[N]`` in [0,1] that each image shows ``concept``."""

    def detects(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        """Per-image boolean ``[N]``: is ``concept`` detected."""


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate a batch ``[N,3,H,W]`` of floats in [0,1] (returned as float32 on the CPU)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N,3,H,W], got shape {tuple(images.shape)}")
    images = images.detach().float().cpu()
    if images.numel() and (images.min() < -1e-4 or images.max() > 1 + 1e-4):
        raise ValueError("expected images with values in [0, 1]")
    return images.clamp(0, 1)


def check_concept(detector: ConceptDetector, concept: str) -> None:
    """A :class:`UserError` if ``detector`` cannot name ``concept``."""
    if concept not in detector.concepts:
        known = ", ".join(detector.concepts)
        raise UserError(f"the {detector.name} detector knows no concept {concept!r} (known: {known})")


def finite_samples(images: torch.Tensor) -> torch.Tensor:
    """Per-image boolean ``[N]``: every value of the image is finite."""
    return images.detach().flatten(1).isfinite().all(dim=1).cpu()


def detects_finite(detector: ConceptDetector, images: torch.Tensor, concept: str) -> torch.Tensor:
    """``detector.detects`` where a sample with any non-finite value is never the concept (a detector would read
    NaN pixels as whatever class its arg-max or threshold falls on)."""
    finite = finite_samples(images)
    if bool(finite.all()):
        return detector.detects(images, concept).cpu()
    return detector.detects(images.nan_to_num(0.0, 0.0, 0.0), concept).cpu() & finite


def concept_rate(detector: ConceptDetector, images: torch.Tensor, concept: str) -> float:
    """Fraction of ``images`` in which ``concept`` is detected (NaN for an empty batch; non-finite samples never)."""
    if images.shape[0] == 0:
        return float("nan")
    return float(detects_finite(detector, images, concept).float().mean())
