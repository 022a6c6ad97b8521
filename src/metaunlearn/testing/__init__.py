"""Test helpers: tiny random pipelines built in code (no downloads) for tests, benchmarks and dry runs of real-user
configs (:mod:`.tiny_pipelines`), and a headless-Chromium look at a report (:mod:`.chromium`).

The pipeline builders are loaded on first use, so ``python -m metaunlearn.testing.chromium`` does not import torch.
"""

from __future__ import annotations

import importlib

__all__ = ["build_tiny_sd", "build_tiny_sdxl", "save_tiny_clip", "save_tiny_pipeline"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("metaunlearn.testing.tiny_pipelines"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
