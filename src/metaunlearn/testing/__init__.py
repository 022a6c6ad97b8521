"""Tiny random pipelines built in code (no downloads) for tests, benchmarks and dry runs of real-user configs."""

from metaunlearn.testing.tiny_pipelines import build_tiny_sd, build_tiny_sdxl, save_tiny_clip, save_tiny_pipeline

__all__ = ["build_tiny_sd", "build_tiny_sdxl", "save_tiny_clip", "save_tiny_pipeline"]
