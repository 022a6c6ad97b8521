"""Where the shipped toy model, detector and evaluation live, and one-line loaders for them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from metaunlearn.config import TOY_ASSET_DIR

if TYPE_CHECKING:  # loaded on use: importing this module stays free of torch and diffusers
    from diffusers import StableDiffusionPipeline

    from .detector import ConceptDetector

ASSET_DIR = TOY_ASSET_DIR  # config files name its contents toy://model, toy://reference, toy://detector
MODEL_SUBDIR = "model"
DETECTOR_FILE = "detector.safetensors"
EVAL_FILE = "eval.json"
RETRAIN_DIR = ASSET_DIR / "retrain_red_triangle"
"""The retrain reference: the shipped recipe without any red triangle (``toy pretrain --exclude red_triangle``)."""


def model_dir(root: str | Path = ASSET_DIR) -> Path:
    """The diffusers pipeline folder under an asset directory."""
    return Path(root) / MODEL_SUBDIR


def detector_path(root: str | Path = ASSET_DIR) -> Path:
    """The detector weights under an asset directory (its JSON sits beside it)."""
    return Path(root) / DETECTOR_FILE


def load_toy_detector(root: str | Path = ASSET_DIR) -> ConceptDetector:
    """The shipped (or given) toy concept detector."""
    from .detector import ConceptDetector

    return ConceptDetector.load(detector_path(root))


def load_toy_pipeline(root: str | Path = ASSET_DIR) -> StableDiffusionPipeline:
    """The shipped (or given) toy text-to-image pipeline, loaded with plain ``from_pretrained``."""
    from .pretrain import load_model

    return load_model(model_dir(root))
