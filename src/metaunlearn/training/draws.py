"""One batch of a training term: its rows, noise and timesteps (:class:`Draw`), drawn from a generator."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from metaunlearn.backbones.base import Backbone
from metaunlearn.data.cache import CachedSet
from metaunlearn.training.denoise import add_noise, denoising_loss
from metaunlearn.training.parallel import Shard


@dataclass
class Draw:
    """One batch: row ``index`` of a data set, its ``noise`` and ``timesteps``; ``target``, when set, is what the
    prediction is regressed onto instead of the noise (see :meth:`anchored`)."""

    index: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor | None = None

    def rows(self, rows: slice) -> Draw:
        """The same draw restricted to some of its rows (a process's share of a data-parallel batch)."""
        target = self.target[rows] if self.target is not None else None
        return Draw(self.index[rows], self.noise[rows], self.timesteps[rows], target)

    def row_slices(self, shard: Shard) -> list[tuple[slice, float]]:
        """This process's row slices of the draw with their shares of the batch (:meth:`Shard.pieces`)."""
        if shard.world == 1 and shard.micro == 1:
            return [(slice(None), 1.0)]
        return shard.pieces(len(self.index))

    def shares(self, shard: Shard) -> list[tuple[Draw, float]]:
        """This process's parts of the draw with their shares of the batch (:meth:`Shard.pieces`); on one process
        with no micro-batches ``[(self, 1.0)]``."""
        if shard.world == 1 and shard.micro == 1:
            return [(self, 1.0)]
        return [(self.rows(rows), share) for rows, share in self.row_slices(shard)]

    def _inputs(self, backbone: Backbone, data: CachedSet):
        x0, cond = data.batch(self.index)
        device, dtype = backbone.device, backbone.dtype
        # contiguous: a freshly VAE-encoded set can be channels-last, a loaded one is not, and the UNet's kernels
        # round differently for the two layouts (results must not depend on where the cache came from)
        x0 = x0.to(device, dtype).contiguous()
        cond = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in cond.items()}
        return x0, cond

    def loss(self, backbone: Backbone, data: CachedSet, unet=None) -> torch.Tensor:
        """``denoising_loss`` on this batch (optionally with another noise predictor ``unet``); regressed onto
        ``target`` when the draw has one."""
        x0, cond = self._inputs(backbone, data)
        return denoising_loss(
            backbone, x0, cond, unet=unet, t=self.timesteps.to(backbone.device),
            noise=self.noise.to(backbone.device, backbone.dtype), target=self.target,
        )

    @torch.no_grad()
    def batch_loss(self, backbone: Backbone, data: CachedSet, shard: Shard, autocast=nullcontext, unet=None) -> float:
        """The whole batch's loss L at the weights the UNet holds now (no gradient): this process's parts weighted
        by their shares, summed across processes (every process calls it alike)."""
        value = 0.0
        for part, share in self.shares(shard):
            with autocast():
                value += share * float(part.loss(backbone, data, unet=unet))
        return shard.sum_values({"loss": value})["loss"]

    @torch.no_grad()
    def anchored(self, backbone: Backbone, data: CachedSet, shard: Shard, autocast=nullcontext, unet=None) -> Draw:
        """This draw with ``target`` = the backbone's current prediction ε_θ(x_t, t, c) on it (no gradient): the
        same batch, noise and timesteps later scored against what the model predicts now — or, given ``unet``,
        that noise predictor's (the start weights θ0: :class:`~metaunlearn.meta.start_weights.StartWeights`).
        Only this process's rows are predicted (the others stay zero and are never read here)."""
        dtype = torch.promote_types(backbone.dtype, torch.float32)  # as the loss compares: half precision upcast
        target = torch.zeros(self.noise.shape, device=backbone.device, dtype=dtype)
        for rows, _ in self.row_slices(shard):
            part = self.rows(rows)
            x0, cond = part._inputs(backbone, data)
            t = part.timesteps.to(backbone.device)
            x_t = add_noise(backbone, x0, part.noise.to(backbone.device, backbone.dtype), t)
            with autocast():
                target[rows] = backbone.predict_noise(x_t, t, cond, unet=unet).to(dtype)
        return Draw(self.index, self.noise, self.timesteps, target)


def draw(
    data: CachedSet,
    index: torch.Tensor,
    num_train_timesteps: int,
    generator: torch.Generator,
    timestep: int | None = None,
) -> Draw:
    """Noise and timesteps for rows ``index`` of ``data``."""
    shape = (len(index), *data.latents.shape[1:])
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if timestep is None:
        t = torch.randint(0, num_train_timesteps, (len(index),), generator=generator)
    else:
        t = torch.full((len(index),), int(timestep), dtype=torch.long)
    return Draw(index, noise, t)


def subset_index(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``min(batch_size, n)`` distinct rows."""
    return torch.randperm(n, generator=generator)[: min(batch_size, n)]
