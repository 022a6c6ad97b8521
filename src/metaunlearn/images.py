"""Sample images as files: a grid of a batch, a mosaic for harmful samples, PNG written atomically.

torch, numpy and PIL are imported on use.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

from metaunlearn.atomic import atomic_write_bytes

if TYPE_CHECKING:
    import numpy as np
    import torch


def image_grid(images: torch.Tensor, ncol: int | None = None, pad: int = 2, min_side: int = 64) -> np.ndarray:
    """``[N,3,H,W]`` in [0,1] -> one ``uint8`` RGB grid (white padding); tiny images are upscaled (nearest)."""
    import numpy as np
    import torch

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

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
