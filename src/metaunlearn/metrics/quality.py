"""Benign image quality: a Fréchet distance with a pluggable feature extractor, and CLIP score with local weights.

Fréchet distance (FID-style) runs through torchmetrics' ``FrechetInceptionDistance(feature=<nn.Module>)`` with an
injected extractor, so nothing is downloaded:

* ``toy`` — the toy detector's penultimate CNN features (offline, shipped);
* ``clip`` — projected image embeddings of a local CLIP folder ("FD_CLIP", Kynkäänniemi et al. 2023);
* any ``nn.Module`` mapping images ``[N,3,H,W]`` in [0,1] to ``[N,D]`` (Python API).

**Inception FID is not offered.** torchmetrics builds its Inception-v3 from torch-fidelity, which needs torchvision
(broken next to the CPU torch used here) and whose weights file is a pickle (metaunlearn never unpickles weights).
Numbers from the extractors above are therefore *not* comparable with published Inception FIDs; compare models
with each other under the same extractor and reference set.

CLIP score runs through torchmetrics' ``CLIPScore`` with a model given as a callable (a local folder, never a hub
name); a thin adapter returns plain feature tensors, because transformers 5 returns output objects from
``get_image_features``/``get_text_features`` where torchmetrics 1.9 expects tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from metaunlearn.metrics.clip_zeroshot import _pooled, load_local_clip, to_uint8_list
from metaunlearn.metrics.detection import check_images

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


class FeatureExtractor(nn.Module):
    """An ``nn.Module`` around a feature function, with the ``num_features`` torchmetrics' FID reads."""

    def __init__(self, fn: FeatureFn, num_features: int, owner: nn.Module | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.num_features = int(num_features)
        self.owner = owner  # registered so .to(device) moves the underlying network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images).double()


def toy_features(detector_path: str | Path | None = None) -> FeatureExtractor:
    """The toy detector's penultimate features (default: the shipped detector)."""
    from metaunlearn.metrics.toy import ToyConceptDetector

    detector = ToyConceptDetector.load(detector_path)
    return FeatureExtractor(detector.features, detector.feature_dim, detector.model)


def clip_features(clip_path: str | Path, device: str | torch.device = "cpu") -> FeatureExtractor:
    """Projected image embeddings of a local CLIP folder."""
    model, processor = load_local_clip(clip_path, device)

    @torch.no_grad()
    def fn(images: torch.Tensor) -> torch.Tensor:
        pixels = processor(images=to_uint8_list(images), return_tensors="pt")["pixel_values"]
        return _pooled(model.get_image_features(pixel_values=pixels.to(device))).float().cpu()

    return FeatureExtractor(fn, model.config.projection_dim, model)


def build_feature_extractor(kind: str, path: str | Path | None = None) -> FeatureExtractor:
    """Feature extractor ``toy`` (optional detector path) or ``clip`` (local CLIP folder path)."""
    if kind == "toy":
        return toy_features(path)
    if kind == "clip":
        if path is None:
            raise ValueError("the clip feature extractor needs a local CLIP folder path")
        return clip_features(path)
    raise ValueError(f"Unknown feature extractor: {kind!r} (known: toy, clip)")


class FrechetDistance:
    """Fréchet distance of image sets to a fixed reference set, in the feature space of ``extractor``.

    Reference features are computed once; each call compares a new set of images against them.
    """

    def __init__(self, extractor: nn.Module, reference: torch.Tensor, batch_size: int = 64) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        if reference.shape[0] < 2:
            raise ValueError("a Fréchet distance needs at least 2 reference images")
        self.batch_size = batch_size
        self.metric = FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=False)
        self._update(check_images(reference), real=True)

    def _update(self, images: torch.Tensor, real: bool) -> None:
        for start in range(0, images.shape[0], self.batch_size):
            self.metric.update(images[start : start + self.batch_size], real=real)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> float:
        if images.shape[0] < 2:
            raise ValueError("a Fréchet distance needs at least 2 generated images")
        self.metric.reset()
        self._update(check_images(images), real=False)
        return float(self.metric.compute())


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, extractor: nn.Module, batch_size: int = 64) -> float:
    """Fréchet distance between two image sets ``[N,3,H,W]`` in [0,1] under ``extractor``."""
    return FrechetDistance(extractor, real, batch_size)(fake)


class _TensorFeaturesCLIP(nn.Module):
    """A CLIPModel whose ``get_*_features`` return tensors, as torchmetrics' CLIPScore expects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return _pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class ClipScorer:
    """CLIP score (100 × cosine of image and prompt embeddings, averaged) with a local CLIP folder."""

    def __init__(self, clip_path: str | Path, batch_size: int = 32) -> None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        model, processor = load_local_clip(clip_path)
        self.batch_size = batch_size
        self.metric = CLIPScore(model_name_or_path=lambda: (_TensorFeaturesCLIP(model), processor))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        if not prompts:
            return float("nan")
        self.metric.reset()
        pixels = to_uint8_list(images)
        for start in range(0, len(pixels), self.batch_size):
            chunk = torch.stack(pixels[start : start + self.batch_size])
            self.metric.update(chunk, list(prompts[start : start + self.batch_size]))
        return float(self.metric.compute())


def clip_score(images: torch.Tensor, prompts: Sequence[str], clip_path: str | Path) -> float:
    """CLIP score of images against their prompts with a local CLIP folder."""
    return ClipScorer(clip_path)(images, prompts)
