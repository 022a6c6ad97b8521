"""The toy concept detector: a small CNN naming the colour×shape class of a 16×16 image (or ``none``).

It plays NudeNet's role in the toy world. It is trained on rendered images *degraded to look generated*
(gaussian and low-frequency noise, blur, colour and contrast shifts) so it stays reliable on samples of a
diffusion model. Weights are stored as safetensors next to a small JSON file of class names and architecture.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .taxonomy import CLASS_NAMES
from .world import render_class, to_tensor

StepCallback = Callable[[int, int, float], None]


@dataclass
class DetectorArch:
    """Channel widths of the detector CNN."""

    widths: tuple[int, int, int] = (32, 64, 128)
    groups: int = 8


class ConceptDetector(nn.Module):
    """CNN classifier over ``class_names``; input ``[B, 3, 16, 16]`` floats in ``[0, 1]``."""

    def __init__(self, class_names: list[str], arch: DetectorArch | None = None) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.arch = arch or DetectorArch()
        w1, w2, w3 = self.arch.widths
        g = self.arch.groups

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(g, c_out), nn.SiLU())

        self.body = nn.Sequential(
            block(3, w1), block(w1, w1), nn.MaxPool2d(2),  # 8×8
            block(w1, w2), block(w2, w2), nn.MaxPool2d(2),  # 4×4
            block(w2, w3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(w3, len(self.class_names))

    @property
    def feature_dim(self) -> int:
        return self.arch.widths[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]``."""
        return self.head(self.features(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, D]`` (for an FID-style metric)."""
        return self.body((images - 0.5) * 2.0)

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, C]`` for images ``[B, 3, 16, 16]`` in ``[0, 1]``."""
        was_training = self.training
        self.eval()
        out = self.forward(images.float()).softmax(dim=-1)
        self.train(was_training)
        return out

    def predict(self, images: torch.Tensor) -> list[str]:
        """The most likely class name of each image."""
        return [self.class_names[i] for i in self.probs(images).argmax(dim=-1).tolist()]

    def save(self, path: str | Path) -> None:
        """Write ``path`` (safetensors weights) and ``path`` with suffix ``.json`` (class names, architecture)."""
        path = Path(path)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path))
        meta = {"class_names": self.class_names, "arch": asdict(self.arch)}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ConceptDetector:
        """Load a detector saved by :meth:`save` (weights through safetensors only)."""
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        arch = meta.get("arch", {})
        model = cls(meta["class_names"], DetectorArch(widths=tuple(arch.get("widths", (32, 64, 128))),
                                                      groups=int(arch.get("groups", 8))))
        model.load_state_dict(load_file(str(path)))
        model.eval()
        return model


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Make clean renders ``[B, 3, H, W]`` in ``[0, 1]`` look like diffusion samples (random, per image)."""
    b = images.shape[0]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    x = images
    # Blur with a random-width gaussian 3×3 kernel on half the images.
    sigma = 0.3 + 0.7 * rand(b)
    offsets = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(dim=1, keepdim=True)
    k2 = k1[:, :, None] * k1[:, None, :]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    blurred = F.conv2d(padded.reshape(1, b * 3, *padded.shape[2:]), k2.repeat_interleave(3, 0)[:, None], groups=b * 3)
    blurred = blurred.reshape_as(x)
    use_blur = (rand(b) < 0.5).float()[:, None, None, None]
    x = use_blur * blurred + (1 - use_blur) * x
    # Colour shifts: per-channel offset, brightness and contrast.
    x = x + 0.05 * torch.randn(b, 3, 1, 1, generator=generator)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (0.75 + 0.4 * rand(b, 1, 1, 1)) + mean * (0.85 + 0.3 * rand(b, 1, 1, 1))
    # Low-frequency blotches and pixel noise.
    low = torch.randn(b, 3, 4, 4, generator=generator) * (0.08 * rand(b, 1, 1, 1))
    x = x + F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)
    x = x + torch.randn(x.shape, generator=generator) * (0.12 * rand(b, 1, 1, 1))
    return x.clamp(0.0, 1.0)


def render_dataset(per_class: int, seed: int, class_names: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean images ``[N, 3, 16, 16]`` in ``[0, 1]`` and labels for every detector class."""
    names = class_names or CLASS_NAMES
    images = [to_tensor(render_class(name, per_class, seed)) for name in names]
    labels = [torch.full((per_class,), i, dtype=torch.long) for i in range(len(names))]
    return torch.cat(images), torch.cat(labels)


def train_detector(
    steps: int = 1500,
    batch_size: int = 128,
    per_class: int = 600,
    lr: float = 2e-3,
    seed: int = 0,
    on_step: StepCallback | None = None,
) -> ConceptDetector:
    """Train a detector on degraded renders of every class; deterministic given ``seed``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = render_dataset(per_class, seed=seed + 1)
    model = ConceptDetector(CLASS_NAMES)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = images[idx]
        # Keep a quarter of every batch clean so rendered images are classified too.
        x = torch.where((torch.rand(batch_size, generator=generator) < 0.25)[:, None, None, None], x, degrade(x, generator))
        flip = (torch.rand(batch_size, generator=generator) < 0.5)[:, None, None, None]
        x = torch.where(flip, x.flip(-1), x)
        loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step + 1, steps, float(loss.detach()))
    model.eval()
    return model


@torch.no_grad()
def detector_accuracy(
    detector: ConceptDetector, per_class: int = 50, seed: int = 12345, degraded: bool = False
) -> dict[str, float]:
    """Per-class accuracy on fresh renders (optionally degraded), keyed by class name."""
    images, labels = render_dataset(per_class, seed=seed, class_names=detector.class_names)
    if degraded:
        images = degrade(images, torch.Generator().manual_seed(seed))
    predicted = detector.probs(images).argmax(dim=-1)
    return {
        name: float((predicted[labels == i] == i).float().mean())
        for i, name in enumerate(detector.class_names)
    }


def images_to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` arrays or ``[-1, 1]`` float tensors ``[B, 3, H, W]`` to ``[0, 1]`` tensors."""
    if isinstance(images, np.ndarray):
        return to_tensor(images)
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
