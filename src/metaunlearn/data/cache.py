"""A data set in model space: latents (or toy-model pixels) and text conditioning, computed once per backbone.

Stored as one safetensors file: tensors ``latents`` and ``cond.<key>``; captions and provenance in its metadata.
Every training stage (unlearning, meta terms, attacks) reads these instead of re-encoding images per step.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metaunlearn.atomic import usual_mode
from metaunlearn.backbones.base import Cond, cond_index
from metaunlearn.errors import UserError, as_os_error


@dataclass
class CachedSet:
    """``latents`` [N,C,h,w] and ``cond`` (batch-first tensors) for ``texts`` (N captions)."""

    latents: torch.Tensor
    cond: Cond
    texts: list[str]
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.texts)
        if self.latents.shape[0] != n or any(v.shape[0] != n for v in self.cond.values()):
            raise ValueError("latents, conditioning and texts must have the same length")

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, Cond]:
        """``(latents, cond)`` rows ``index``."""
        return self.latents[index], cond_index(self.cond, index)

    def to(self, device: torch.device | str) -> CachedSet:
        return CachedSet(
            self.latents.to(device), {k: v.to(device) for k, v in self.cond.items()}, self.texts, self.meta
        )

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"latents": self.latents.contiguous().cpu()}
        tensors.update({f"cond.{k}": v.contiguous().cpu() for k, v in self.cond.items()})
        metadata = {"texts": json.dumps(self.texts), **{f"meta.{k}": str(v) for k, v in self.meta.items()}}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            try:
                save_file(tensors, tmp, metadata=metadata)
            except SafetensorError as exc:  # a full disk or a file-size limit: the same one line as an OSError
                raise as_os_error(exc, path) from None
            os.chmod(tmp, usual_mode())  # mkstemp made it private to the owner
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CachedSet:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"cache file not found: {path}")
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path} is not a readable safetensors cache: {exc}") from None
        texts = json.loads(metadata.get("texts", "[]"))
        meta = {k[5:]: v for k, v in metadata.items() if k.startswith("meta.")}
        cond = {k[5:]: v for k, v in tensors.items() if k.startswith("cond.")}
        return cls(tensors["latents"], cond, texts, meta)
