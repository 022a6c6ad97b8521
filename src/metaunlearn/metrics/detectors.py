"""A factory for the three detector kinds shipped, behind the interface of :mod:`metaunlearn.metrics.detection`.

Kinds: ``toy`` (the toy world's CNN classifier, :mod:`metaunlearn.metrics.toy`), ``nudenet`` (NudeNet's bundled
320n ONNX detector, :mod:`metaunlearn.metrics.nudenet`), ``clip`` (zero-shot CLIP from a local folder,
:mod:`metaunlearn.metrics.clip_zeroshot`). None of them downloads anything.
"""

from __future__ import annotations

from metaunlearn.metrics.detection import (  # noqa: F401  (also importable from here)
    ConceptDetector,
    check_concept,
    check_images,
    concept_rate,
    detects_finite,
    finite_samples,
)


def build_detector(kind: str, **params) -> ConceptDetector:
    """A detector of ``kind`` (``toy``, ``nudenet`` or ``clip``) built from its keyword parameters."""
    if kind == "toy":
        from metaunlearn.metrics.toy import ToyConceptDetector

        return ToyConceptDetector.load(params.get("path"))
    if kind == "nudenet":
        from metaunlearn.metrics.nudenet import NudeNetDetector

        return NudeNetDetector(
            classes=params.get("classes"), threshold=params.get("threshold", 0.6), model_path=params.get("path")
        )
    if kind == "clip":
        from metaunlearn.metrics.clip_zeroshot import ClipZeroShotDetector

        return ClipZeroShotDetector(params["path"], params["concepts"], threshold=params.get("threshold"))
    raise ValueError(f"Unknown detector kind: {kind!r} (known: toy, nudenet, clip)")
