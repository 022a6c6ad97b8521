"""The unattacked model's evaluation — snapshot 0 of every attack run — computed once per model and evaluation
setting and shared by every run of a sweep, across its attack sets.

Every finetuning run starts from the same released weights, so its step-0 evaluation is the same for every run
that evaluates the same prompts (an attack judged on its own trigger, e.g. DreamBooth's instance prompt or a
textual-inversion token, has its own; so has one that loads the weights quantized). An entry is keyed by a SHA-256
of the model's content fingerprint, the device and dtype it runs in, and every evaluation setting: the evaluator's
full config, the prompts it samples (a trigger included), content digests of the files it loads, the run's
textual-inversion and quantization settings and the grid settings — so it is never reused after any of them
changed. With a folder, entries also live on disk (``<key>.json`` with the metrics, ``<key>.png`` with the step-0
grid, each written atomically), so a resumed or later sweep of the same model does not evaluate it again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from metaunlearn.atomic import atomic_write_bytes, atomic_write_text


PATH_FIELDS = (("detector", "path"), ("quality", "fid_features_path"), ("quality", "fid_reference"),
               ("quality", "clip_score_path"))
"""Config paths left out of :func:`evaluation_setting`: the content digests of what they point to stand in."""


def evaluation_setting(evaluator) -> str | None:
    """A short SHA-256 of every evaluation setting (the evaluator's config, the prompts it samples, content
    digests of the files it loads) but not of where files lie; attack result rows carry it as ``eval_setting``, so
    results measured differently are never compared (None without an evaluator)."""
    if evaluator is None:
        return None
    config = evaluator.config.model_dump(mode="json")
    for section, name in PATH_FIELDS:
        config[section].pop(name, None)
    for spec in config["prompt_sets"]:
        spec.pop("prompts_file", None)  # the prompts themselves are in the inputs
    for name in ("grid_set", "grid_pixelate"):  # what the grids show changes no number
        config.pop(name, None)
    payload = {"eval": config, "inputs": evaluator.inputs()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StepZeroEvaluations:
    """Step-0 metrics (and grid PNG bytes) by :meth:`key`; on disk under ``folder`` when the model has a
    fingerprint (a model without one is only shared within this object's lifetime)."""

    def __init__(self, model_fingerprint: str | None, folder: str | Path | None = None) -> None:
        self.fingerprint = model_fingerprint
        self.folder = Path(folder) if folder is not None and model_fingerprint else None
        self._memory: dict[str, tuple[dict[str, float], bytes | None]] = {}

    def key(self, backbone, evaluator, **settings) -> str:
        """The entry of ``backbone`` (this object's model) under ``evaluator`` and the run's other ``settings``."""
        payload = {
            "model": self.fingerprint,
            "device": backbone.device.type,
            "dtype": str(backbone.dtype),
            "torch": torch.__version__,
            "eval": evaluator.config.model_dump(mode="json"),
            "inputs": evaluator.inputs(),
            **settings,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get(self, key: str) -> tuple[dict[str, float], bytes | None] | None:
        if key in self._memory:
            return self._memory[key]
        if self.folder is None or not (self.folder / f"{key}.json").is_file():
            return None
        try:
            metrics = json.loads((self.folder / f"{key}.json").read_text())["metrics"]
        except (OSError, ValueError, KeyError):
            return None  # an unreadable entry is evaluated again
        png = self.folder / f"{key}.png"
        entry = {k: (float("nan") if v is None else v) for k, v in metrics.items()}, (
            png.read_bytes() if png.is_file() else None)
        self._memory[key] = entry
        return entry

    def put(self, key: str, metrics: dict[str, float], grid: bytes | None) -> None:
        self._memory[key] = dict(metrics), grid
        if self.folder is None:
            return
        if grid is not None:
            atomic_write_bytes(self.folder / f"{key}.png", grid)
        safe = {k: (v if isinstance(v, (int, float)) and v == v and abs(v) != float("inf") else None)
                for k, v in metrics.items()}
        atomic_write_text(self.folder / f"{key}.json", json.dumps({"metrics": safe}, indent=1) + "\n")
