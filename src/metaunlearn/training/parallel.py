"""Data parallelism by batch splitting: every process computes its rows of the same global batch; gradients summed.

Under ``torchrun`` or ``accelerate launch`` every process of a stage draws the *same* random numbers (the global
batch's rows, noise and timesteps, from a stream seeded alike on every rank), computes the loss on its own slice of
the rows only, weighted by the slice's share of the global batch, and the gradients are summed across processes.
The sum is the gradient of the mean over the global batch, so the update equals the single-process update at the
same batch, up to floating-point summation order, whatever the number of processes. Gradient accumulation cuts each
process's rows into ``micro`` consecutive micro-batches computed one after another (less activation memory, the same
update).

DDP's module wrapper is not used for this: the meta step takes inner gradients with ``torch.autograd.grad`` (which
DDP's reducer never sees) and backpropagates several losses per step, and the exact second-order gradient needs the
inner all-reduce inside the autograd graph (:meth:`Shard.sum_differentiable`). One explicit, bucketed all-reduce per
gradient is simpler and exact.

A term every process computes identically (a base method's loss drawn from the shared stream, e.g. ESD's one
prompt per step) is weighted by :attr:`Shard.replicated` = 1/N, so the sum counts it once and no rank can drift
from the others.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

BUCKET_ELEMENTS = 1 << 24
"""Elements per all-reduce bucket (64 MiB of fp32): few collectives, bounded extra memory."""


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel stage: ``rank`` of ``world`` processes, ``micro`` micro-batches."""

    rank: int = 0
    world: int = 1
    micro: int = 1

    @classmethod
    def of(cls, accelerator) -> Shard:
        """The shard of an :class:`accelerate.Accelerator` (its process index, count and accumulation steps)."""
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.gradient_accumulation_steps)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def replicated(self) -> float:
        """Weight of a term every process computes alike (counted once in the sum)."""
        return 1.0 / self.world

    def pieces(self, n: int) -> list[tuple[slice, float]]:
        """This process's row slices of a global batch of ``n`` rows (one per non-empty micro-batch), each with its
        share ``rows / n``. The global batch is cut into ``world × micro`` contiguous parts as evenly as possible;
        process ``r`` takes parts ``r·micro … (r+1)·micro − 1``. One process, one micro-batch: ``[(0:n, 1.0)]``."""
        parts = self.world * self.micro
        bounds = [n * i // parts for i in range(parts + 1)]
        out = []
        for i in range(self.rank * self.micro, (self.rank + 1) * self.micro):
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                out.append((slice(lo, hi), (hi - lo) / n))
        return out

    # ---- collectives (no-ops on one process) ------------------------------------------------------------------------
    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum ``tensors`` across processes, in place, in buckets of at most :data:`BUCKET_ELEMENTS`."""
        if not self.distributed:
            return
        bucket: list[torch.Tensor] = []
        size = 0
        for t in tensors:
            if bucket and (size + t.numel() > BUCKET_ELEMENTS or t.dtype != bucket[0].dtype
                           or t.device != bucket[0].device):
                _all_reduce_flat(bucket)
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel()
        if bucket:
            _all_reduce_flat(bucket)

    def sum_grads_(self, params: Sequence[torch.Tensor]) -> None:
        """Sum the parameters' ``.grad`` across processes. A gradient that is ``None`` on some processes but not on
        others counts as zero there; one that is ``None`` everywhere stays ``None`` (the optimizer skips it, as on
        one process)."""
        if not self.distributed:
            return
        params = list(params)
        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        torch.distributed.all_reduce(has)
        reduced = []
        for p, anywhere in zip(params, has.tolist()):
            if anywhere:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                reduced.append(p.grad)
        self.sum_(reduced)

    def sum_differentiable(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` summed across processes inside the autograd graph (backward sums the incoming gradients
        across processes too): for gradients that later steps differentiate through, e.g. the simulated attack's
        inner gradients under the exact second-order meta gradient."""
        tensors = list(tensors)
        if not self.distributed:
            return tensors
        from torch.distributed.nn.functional import all_reduce

        flat = torch.cat([t.reshape(-1) for t in tensors])
        with warnings.catch_warnings():  # deprecated in favour of functional collectives, which have no autograd
            warnings.simplefilter("ignore", FutureWarning)
            flat = all_reduce(flat)
        return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def sum_values(self, values: Mapping[str, float]) -> dict[str, float]:
        """Logged numbers summed across processes (each process holds its share of a global mean)."""
        if not self.distributed or not values:
            return dict(values)
        names = sorted(values)
        device = torch.device("cuda", torch.cuda.current_device()) if _nccl() else torch.device("cpu")
        total = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        return dict(zip(names, total.tolist()))

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy the main process's values of ``tensors`` to every process (e.g. a randomly initialised adapter)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for t in tensors:
                torch.distributed.broadcast(t.data, src=0)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


SINGLE = Shard()
"""One process, no micro-batches."""


def _nccl() -> bool:
    return torch.distributed.get_backend() == "nccl"


def _all_reduce_flat(tensors: list[torch.Tensor]) -> None:
    if len(tensors) == 1 and tensors[0].is_contiguous():
        torch.distributed.all_reduce(tensors[0])
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    torch._foreach_copy_(tensors, [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in tensors]), tensors)])
