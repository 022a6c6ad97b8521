"""The standard ε-prediction denoising loss L(θ; D) every stage shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metaunlearn.backbones.base import Backbone, Cond


def add_noise(backbone: Backbone, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0) under the backbone's training noise schedule."""
    return backbone.noise_scheduler.add_noise(x0, noise, t)


def sample_timesteps(backbone: Backbone, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform training timesteps in [0, T)."""
    t = torch.randint(0, backbone.num_train_timesteps, (n,), generator=generator)
    return t.to(backbone.device)


def denoising_loss(
    backbone: Backbone,
    x0: torch.Tensor,
    cond: Cond,
    *,
    unet: torch.nn.Module | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean ‖ε − ε_θ(x_t, t, c)‖² over a batch; random ``t``/``noise`` unless given (common random numbers).

    ``target`` replaces ε as what the prediction is regressed onto (e.g. another model's prediction at the same
    x_t, t: the meta objective's anchored forget term)."""
    if t is None:
        t = sample_timesteps(backbone, x0.shape[0], generator)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    x_t = add_noise(backbone, x0, noise, t)
    pred = backbone.predict_noise(x_t, t, cond, unet=unet)
    dtype = torch.promote_types(pred.dtype, torch.float32)  # half precision upcast; float64 stays float64
    goal = noise if target is None else target.to(pred.device)
    return F.mse_loss(pred.to(dtype), goal.to(dtype))
