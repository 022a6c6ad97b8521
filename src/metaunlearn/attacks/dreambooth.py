"""DreamBooth-style attacks: instance captions with a rare token and a prior-preservation loss on class images the
attacked model generates itself (Ruiz et al. 2023; diffusers' ``train_dreambooth.py``).

Class images are sampled from the model *before* it is finetuned and cached as latents + conditioning under a key
made of the model's fingerprint (:func:`metaunlearn.data.caching.model_fingerprint`: every component, UNet
included) and the class settings, so a different model or setting never reuses them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from metaunlearn.attacks.kind_settings import DreamBoothSettings
from metaunlearn.backbones.base import Backbone, Cond
from metaunlearn.data.cache import CachedSet
from metaunlearn.training.denoise import add_noise, sample_timesteps

CLASS_CACHE_PREFIX = "dreambooth-class"


def class_cache_file(backbone: Backbone, settings: DreamBoothSettings, cache_dir: str | Path) -> Path:
    """Where the class images of ``settings`` sampled from ``backbone`` are cached."""
    from metaunlearn.data.caching import model_fingerprint

    keyed = {k: v for k, v in settings.model_dump(mode="json").items() if k not in ("instance_prompt", "prior_weight")}
    key = hashlib.sha256(f"{model_fingerprint(backbone)}|{json.dumps(keyed, sort_keys=True)}".encode()).hexdigest()
    return Path(cache_dir) / f"{CLASS_CACHE_PREFIX}-{key[:24]}.safetensors"


@torch.no_grad()
def class_images(backbone: Backbone, settings: DreamBoothSettings, cache_dir: str | Path | None = None) -> CachedSet:
    """The prior-preservation set: ``class_images`` samples of the class prompt from ``backbone`` (cached)."""
    path = class_cache_file(backbone, settings, cache_dir) if cache_dir is not None else None
    if path is not None and path.is_file():
        return CachedSet.load(path).to(backbone.device)
    prompts = [settings.class_prompt] * settings.class_images
    images = backbone.sample(prompts, steps=settings.sampler_steps, guidance=settings.guidance, seed=settings.seed)
    latents = backbone.encode_images(images).float().cpu().contiguous()
    cond = {k: v.float().cpu().contiguous() for k, v in backbone.encode_prompts(prompts).items()}
    made = CachedSet(latents, cond, prompts, {"model": backbone.source, "class_prompt": settings.class_prompt})
    if path is not None:
        made.save(path)
    return made.to(backbone.device)


def prior_preservation_loss(
    backbone: Backbone,
    x_instance: torch.Tensor,
    cond_instance: Cond,
    x_class: torch.Tensor,
    cond_class: Cond,
    prior_weight: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``mean‖ε − ε_θ(x_t, c_inst)‖² + prior_weight · mean‖ε' − ε_θ(x'_t, c_class)‖²`` in one UNet pass.

    Instance and class batches are concatenated (as diffusers' script does), noised with one draw of timesteps
    and noise, and the prediction split back; each term is the mean over its own half.
    """
    n = x_instance.shape[0]
    x0 = torch.cat([x_instance, x_class.to(x_instance.dtype)])
    cond = {k: torch.cat([cond_instance[k], cond_class[k].to(cond_instance[k].dtype)]) for k in cond_instance}
    t = sample_timesteps(backbone, x0.shape[0], generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    pred = backbone.predict_noise(add_noise(backbone, x0, noise, t), t, cond).float()
    instance = F.mse_loss(pred[:n], noise[:n].float())
    prior = F.mse_loss(pred[n:], noise[n:].float())
    return instance + prior_weight * prior
