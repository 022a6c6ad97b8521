"""Partial DDIM sampling with classifier-free guidance: the x_t that ESD and SDD train on.

ESD and SDD do not noise data; they run the diffusion model itself from pure noise part of the way down a DDIM
chain under the concept prompt and train at the state reached. The stop index is drawn uniformly among the DDIM
steps (as the official ESD code does), and the returned timestep is the exact DDIM timestep of that state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler

from metaunlearn.backbones.base import Backbone, Cond, cond_cat

NoisePredictor = Callable[..., torch.Tensor]


class PartialDDIMSampler:
    """Runs ``stop`` DDIM steps (of ``num_steps``) with CFG from seeded noise; owns its scheduler copy."""

    def __init__(self, backbone: Backbone, num_steps: int, guidance: float) -> None:
        self.backbone = backbone
        self.num_steps = num_steps
        self.guidance = guidance
        self.scheduler = DDIMScheduler.from_config(backbone.sample_scheduler.config)
        self.scheduler.set_timesteps(num_steps, device=backbone.device)

    def noise_shape(self, n: int) -> tuple[int, ...]:
        cfg = self.backbone.unet.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (n, cfg.in_channels, h, w)

    def draw_stop(self, generator: torch.Generator) -> int:
        """A stop index uniform in ``[0, num_steps)``."""
        return int(torch.randint(0, self.num_steps, (1,), generator=generator))

    @torch.no_grad()
    def sample(
        self,
        cond: Cond,
        null: Cond,
        stop: int,
        generator: torch.Generator,
        unet: NoisePredictor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, t)`` after ``stop`` guided DDIM steps from fresh noise; ``t`` is a ``[B]`` timestep tensor."""
        backbone = self.backbone
        n = next(iter(cond.values())).shape[0]
        x = torch.randn(self.noise_shape(n), generator=generator, dtype=torch.float32)
        x = x.to(backbone.device, backbone.dtype) * self.scheduler.init_noise_sigma
        both = cond_cat([null, cond])
        timesteps = self.scheduler.timesteps
        for t in timesteps[:stop]:
            x_in = self.scheduler.scale_model_input(torch.cat([x, x]), t)
            t_in = t.expand(2 * n).to(backbone.device)
            eps_null, eps_cond = backbone.predict_noise(x_in, t_in, both, unet=unet).chunk(2)
            eps = eps_null + self.guidance * (eps_cond - eps_null)
            x = self.scheduler.step(eps, t, x).prev_sample
        t_stop = timesteps[stop].expand(n).to(backbone.device)
        return x, t_stop
