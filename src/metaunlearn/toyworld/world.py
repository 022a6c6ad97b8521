"""Deterministic rendering of the embedded concept world (16×16 RGB images of flat-coloured shapes).

Each image is one large shape of a flat colour on a plain dark-grey background, with jitter in position
(±1.5 px), size, rotation (±20°, circles excepted) and colour (σ = 0.03 per channel), anti-aliased by
4× supersampling. Rendering is deterministic: the same ``(name, n, seed)`` always gives the same pixels
(a numpy ``Generator`` seeded from the seed and the class name).

Image conventions: :func:`render` returns ``uint8`` arrays ``[n, 16, 16, 3]``; :func:`to_tensor` turns them
into float tensors ``[n, 3, 16, 16]`` in ``[0, 1]`` (the detector's input); diffusion models see ``2x - 1``.
See :mod:`metaunlearn.toyworld.taxonomy` for the concepts and roles (re-exported here).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from .taxonomy import (
    CLASS_NAMES,
    COLOURS,
    CONCEPT_BY_NAME,
    CONCEPTS,
    NONE_CLASS,
    ROLES,
    SHAPES,
    Concept,
    concept_of_prompt,
    concepts_for,
    get_concept,
    heldout_prompts,
    prompts_for,
)

__all__ = [
    "CLASS_NAMES",
    "CONCEPTS",
    "CONCEPT_BY_NAME",
    "IMAGE_SIZE",
    "ROLES",
    "Concept",
    "concept_of_prompt",
    "concepts_for",
    "get_concept",
    "heldout_prompts",
    "prompts_for",
    "render",
    "render_class",
    "to_tensor",
    "to_uint8",
]

IMAGE_SIZE = 16
SUPERSAMPLE = 4
BACKGROUND = 0.15
BACKGROUND_JITTER = 0.03
COLOUR_JITTER = 0.03


def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def _grid() -> tuple[np.ndarray, np.ndarray]:
    side = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(side) + 0.5) / SUPERSAMPLE
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    return xs, ys


def _shape_mask(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean masks ``[n, 64, 64]`` of ``shape`` at jittered position, size and rotation."""
    xs, ys = _grid()
    cx = IMAGE_SIZE / 2 + rng.uniform(-1.5, 1.5, n)
    cy = IMAGE_SIZE / 2 + rng.uniform(-1.5, 1.5, n)
    radius = rng.uniform(4.6, 6.0, n)
    angle = np.deg2rad(rng.uniform(-20.0, 20.0, n)) if shape != "circle" else np.zeros(n)
    dx = xs[None] - cx[:, None, None]
    dy = ys[None] - cy[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = cos * dx + sin * dy  # rotated frame; v grows downwards like image rows
    v = -sin * dx + cos * dy
    r = radius[:, None, None]
    if shape == "circle":
        return u**2 + v**2 <= (0.92 * r) ** 2
    if shape == "square":
        half = 0.8 * r
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "cross":
        arm, width = 1.0 * r, 0.36 * r
        return ((np.abs(u) <= width) & (np.abs(v) <= arm)) | ((np.abs(v) <= width) & (np.abs(u) <= arm))
    if shape == "triangle":
        # Equilateral, apex up, circumradius 1.3 r, centred on its centroid.
        big = 1.3 * r
        bottom = v <= big / 2
        slope = np.sqrt(3.0)
        left = slope * u - v <= big  # edges through the apex (0, -big)
        right = -slope * u - v <= big
        return bottom & left & right
    raise ValueError(f"Unknown shape: {shape!r} (known: {', '.join(SHAPES)})")


def _downsample(canvas: np.ndarray) -> np.ndarray:
    n, side, _, ch = canvas.shape
    s = SUPERSAMPLE
    return canvas.reshape(n, side // s, s, side // s, s, ch).mean(axis=(2, 4))


def _background(n: int, rng: np.random.Generator) -> np.ndarray:
    level = BACKGROUND + rng.uniform(-BACKGROUND_JITTER, BACKGROUND_JITTER, n)
    return np.broadcast_to(level[:, None, None, None], (n, 1, 1, 3))


def render_class(name: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` images ``uint8 [n, 16, 16, 3]`` of detector class ``name`` (any colour_shape pair, or ``none``)."""
    if name not in CLASS_NAMES:
        raise ValueError(f"Unknown class: {name!r} (known: {', '.join(CLASS_NAMES)})")
    rng = _rng(name, seed)
    background = _background(n, rng)
    if name == NONE_CLASS:
        images = np.broadcast_to(background, (n, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float64)
        return to_uint8(images)
    colour, shape = name.split("_", 1)
    base = np.asarray(COLOURS[colour])
    fill = np.clip(base[None] + rng.normal(0.0, COLOUR_JITTER, (n, 3)), 0.0, 1.0)
    mask = _shape_mask(shape, n, rng)[..., None].astype(np.float64)
    canvas = mask * fill[:, None, None, :] + (1.0 - mask) * background
    return to_uint8(_downsample(canvas))


def render(concept_name: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` images ``uint8 [n, 16, 16, 3]`` of the world concept ``concept_name``; deterministic per seed."""
    get_concept(concept_name)
    return render_class(concept_name, n, seed)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in ``[0, 1]`` (any layout) to ``uint8``."""
    return np.clip(np.rint(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``uint8 [n, H, W, 3]`` to float ``[n, 3, H, W]`` in ``[0, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
