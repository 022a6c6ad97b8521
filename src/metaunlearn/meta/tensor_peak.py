"""The peak of live tensor memory on a device, measured the way a GPU's caching allocator counts it.

``torch.cuda.max_memory_allocated`` reports the largest total of live tensor storages; on CPU there is no such
counter, and a process's resident memory (RSS) adds the Python/torch runtime, the C allocator's cached pages and
library pages — at the size of a tiny test pipeline those are most of it. :class:`TensorPeak` counts storages
instead: on entry every live tensor on the device (found through the garbage collector: weights, gradients,
optimizer state, data), then every storage an operator returns while it is active (a ``TorchDispatchMode``: the
forward, autograd's backward passes and optimizer steps alike), each counted once and subtracted when it is freed
(a weak reference to the storage). Storages made without an operator (numpy arrays, memory-mapped files) are not
seen; there is no allocator rounding or fragmentation in the figure (a GPU allocator's reserved memory is larger).
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _live_objects():
    gc.collect()
    return gc.get_objects()


class TensorPeak(TorchDispatchMode):
    """Within ``with TensorPeak(device) as tracker:``, ``tracker.peak`` is the largest total of live tensor storages
    on ``device`` (bytes; counting the ones alive on entry, ``tracker.start``) and ``tracker.current`` the total now.
    (The tensors alive on entry must be known: an operator may return a view of one.)"""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device).type
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.start = 0

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != self.device or tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        size = storage.nbytes()
        old = self.live.get(key)
        if old == size:
            return
        if old is None:
            weakref.finalize(storage, self._free, key)
        self.live[key] = size
        self.current += size - (old or 0)
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __enter__(self):
        for obj in _live_objects():
            try:
                if issubclass(type(obj), torch.Tensor):  # type(): no attribute lookups on arbitrary objects
                    self._track(obj)
            except (RuntimeError, ReferenceError):  # tensors without storage (meta, functional wrappers)
                continue
        self.start = self.peak = self.current
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        if func._schema.is_mutable:  # in-place and out= ops may have resized their operands' storages
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor):
                    self._track(t)
        return out
