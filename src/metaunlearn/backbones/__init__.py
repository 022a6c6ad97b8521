"""Backbone adapters: one per model family over a diffusers pipeline folder (SD-1.x/2.x, SDXL, the toy model)."""

from metaunlearn.backbones.base import Backbone, Cond, TRAINABLE_SUBSETS
from metaunlearn.backbones.loading import load_backbone, inspect_model_folder

__all__ = ["Backbone", "Cond", "TRAINABLE_SUBSETS", "load_backbone", "inspect_model_folder"]
