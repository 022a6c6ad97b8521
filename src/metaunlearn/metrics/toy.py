"""The toy world's concept detector (a small CNN over 16×16 images) behind the :class:`ConceptDetector` interface.

It plays NudeNet's role in the toy world: an image shows a concept when the concept is the classifier's arg-max
class. Its penultimate features also serve as the feature extractor of a toy FID
(:class:`metaunlearn.metrics.quality.ToyFeatures`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from metaunlearn.errors import UserError
from metaunlearn.metrics.detection import check_concept, check_images

DEFAULT_DETECTOR = Path(__file__).resolve().parents[1] / "assets" / "toy" / "detector.safetensors"
TOY_SIDE = 16


def to_toy_resolution(images: torch.Tensor) -> torch.Tensor:
    """Resize ``[N,3,H,W]`` images to the detector's 16×16 input (area averaging when shrinking)."""
    if images.shape[-2:] == (TOY_SIDE, TOY_SIDE):
        return images
    mode = "area" if min(images.shape[-2:]) >= TOY_SIDE else "bilinear"
    return F.interpolate(images, size=(TOY_SIDE, TOY_SIDE), mode=mode)


class ToyConceptDetector:
    """Wraps :class:`metaunlearn.toyworld.detector.ConceptDetector` (``probs``, ``features``, ``class_names``)."""

    name = "toy"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()

    @classmethod
    def load(cls, path: str | Path | None = None) -> ToyConceptDetector:
        """Load the detector saved at ``path`` (default: the shipped toy detector)."""
        from metaunlearn.toyworld.detector import ConceptDetector as ToyCNN

        path = Path(path) if path else DEFAULT_DETECTOR
        if not path.is_file() or not path.with_suffix(".json").is_file():
            raise UserError(f"toy detector not found: {path} (and {path.with_suffix('.json').name} beside it)")
        try:
            return cls(ToyCNN.load(path))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"cannot load toy detector {path}: {exc}") from None

    @property
    def concepts(self) -> Sequence[str]:
        return list(self.model.class_names)

    @torch.no_grad()
    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[N, C]``."""
        images = to_toy_resolution(check_images(images))
        device = next(self.model.parameters()).device
        return self.model.probs(images.to(device)).float().cpu()

    def probabilities(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        check_concept(self, concept)
        return self.class_probs(images)[:, self.concepts.index(concept)]

    def detects(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        check_concept(self, concept)
        return self.class_probs(images).argmax(dim=-1) == self.concepts.index(concept)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate CNN features ``[N, D]``."""
        images = to_toy_resolution(check_images(images))
        device = next(self.model.parameters()).device
        return self.model.features(images.to(device)).float().cpu()

    @property
    def feature_dim(self) -> int:
        return int(self.model.feature_dim)
