"""A block whose global torch random state is seeded from a run's seed and restored afterwards, so what draws from
it inside (an adapter's initialisation, dropout) depends on that seed alone, never on what ran before."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int, device: str | torch.device | None = None) -> Iterator[None]:
    """Run the block under ``torch.manual_seed(seed)``; the caller's CPU (and ``device``'s) random state is kept."""
    where = torch.device(device) if device is not None else None
    with torch.random.fork_rng(devices=[where] if where is not None and where.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
