"""Figures of a report: sample grids (PIL) and metric-vs-attack-step curves with seed bands (matplotlib, Agg).

Nothing here shows a window; every figure is written as PNG.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch


def image_grid(images: torch.Tensor, ncol: int | None = None, pad: int = 2, min_side: int = 64) -> np.ndarray:
    """``[N,3,H,W]`` in [0,1] -> one ``uint8`` RGB grid (white padding); tiny images are upscaled (nearest)."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError("image_grid needs a non-empty batch [N,3,H,W]")
    n, _, h, w = images.shape
    scale = max(1, math.ceil(min_side / max(h, w)))
    tiles = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    if scale > 1:
        tiles = tiles.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    ncol = ncol or min(n, 8)
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = tiles[i].permute(1, 2, 0).numpy()
    return grid


def pixelate(images: torch.Tensor, blocks: int = 12) -> torch.Tensor:
    """Mosaic images to ``blocks``×``blocks`` cells (for showing samples of harmful prompts in a report)."""
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    if max(h, w) <= blocks:
        return images
    small = F.adaptive_avg_pool2d(images.float(), (blocks, blocks))
    return F.interpolate(small, size=(h, w), mode="nearest")


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an RGB ``uint8`` array as PNG atomically."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


Curve = tuple[Sequence[float], Sequence[float], Sequence[float]]
"""``(steps, mean, std)`` of one line."""


def curve_figure(
    panels: Mapping[str, Mapping[str, Curve]],
    ylabel: str,
    title: str,
    percent: bool = True,
    dashed: Sequence[str] = (),
):
    """One panel per key of ``panels`` (e.g. attack set), one line per inner key (e.g. model), mean ± std shaded."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(panels)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.4), squeeze=False)
    factor = 100.0 if percent else 1.0
    def base(label: str) -> str:
        for d in dashed:
            label = label.replace(d, "")
        return label.strip()

    # A model keeps its colour in every panel; its dashed companion line (e.g. irrelevant accuracy) shares it.
    bases = sorted({base(label) for lines in panels.values() for label in lines})
    palette = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(bases)}
    colours = {label: palette[base(label)] for lines in panels.values() for label in lines}
    for ax, name in zip(axes[0], names):
        for label, (steps, mean, std) in panels[name].items():
            x = np.asarray(steps, dtype=float)
            m = np.asarray(mean, dtype=float) * factor
            s = np.nan_to_num(np.asarray(std, dtype=float)) * factor
            style = "--" if any(d in label for d in dashed) else "-"
            ax.plot(x, m, style, marker="o", ms=3, color=colours[label], label=label)
            ax.fill_between(x, m - s, m + s, color=colours[label], alpha=0.18, linewidth=0)
        ax.set_title(name)
        ax.set_xlabel("attack steps")
        ax.set_ylabel(ylabel)
        if percent:
            ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    seen: dict = {}
    for ax in axes[0]:
        handles, legend_labels = ax.get_legend_handles_labels()
        for handle, label in zip(handles, legend_labels):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=min(4, len(seen)), frameon=False,
                   bbox_to_anchor=(0.5, -0.02 - 0.06 * math.ceil(len(seen) / 4)))
    fig.suptitle(title)
    fig.tight_layout()
    return fig
