"""The one interface every stage uses to talk to a text-to-image model.

A :class:`Backbone` wraps a real diffusers pipeline (``self.pipe``) and exposes what unlearning, meta-unlearning,
attacks and metrics need: prompt conditioning, images <-> model space, the noise prediction, sampling through the
pipeline itself, trainable parameter subsets and saving a standard diffusers folder.

Conditioning is a plain ``dict[str, Tensor]`` (:data:`Cond`) whose tensors all share the batch dimension first, so
it can be cached in safetensors, sliced with :func:`cond_index` and concatenated with :func:`cond_cat`.
"""

from __future__ import annotations

import abc
import contextlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

from metaunlearn.errors import UserError, as_os_error, is_io_error

Cond = dict[str, torch.Tensor]

TRAINABLE_SUBSETS = ("full", "xattn", "noxattn", "selfattn")
"""ESD's parameter subsets: ``xattn`` = cross-attention (ESD-x), ``noxattn`` = all but cross-attention and the
time/class embeddings and output conv (ESD-u), ``selfattn`` = self-attention, ``full`` = every UNet weight (ESD-f)."""

MARKER_FILE = "metaunlearn.json"
"""Written at a model folder's root for models without a VAE (``{"pixel_space": true}``); plain diffusers ignores it."""


def cond_index(cond: Cond, index: torch.Tensor | slice | Sequence[int]) -> Cond:
    """Rows ``index`` of every conditioning tensor."""
    return {k: v[index] for k, v in cond.items()}


def cond_cat(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditionings along the batch dimension."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_to(cond: Cond, device: torch.device | str, dtype: torch.dtype | None = None) -> Cond:
    """Move conditioning to a device (floating tensors also to ``dtype`` when given)."""
    out = {}
    for k, v in cond.items():
        v = v.to(device)
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out


def _is_cross_attention(name: str) -> bool:
    return ".attn2." in name


def _in_subset(name: str, subset: str) -> bool:
    if subset == "full":
        return True
    if subset == "xattn":
        return _is_cross_attention(name)
    if subset == "selfattn":
        return ".attn1." in name
    if subset == "noxattn":
        excluded = ("time_embedding", "add_embedding", "class_embedding", "conv_out", "conv_norm_out")
        return not _is_cross_attention(name) and not name.startswith(excluded)
    raise UserError(f"unknown trainable subset {subset!r}; choose one of {', '.join(TRAINABLE_SUBSETS)}")


class Backbone(abc.ABC):
    """A diffusers text-to-image pipeline seen through the operations metaunlearn needs."""

    family: str = "base"

    def __init__(self, pipe: DiffusionPipeline, source: str | Path, pixel_space: bool = False) -> None:
        self.pipe = pipe
        self.source = str(source)
        self.pixel_space = pixel_space
        self.pipe.set_progress_bar_config(disable=True)
        # Training uses the model's own noise schedule; sampling uses DDIM built from the same config.
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.sample_scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.original_scheduler = pipe.scheduler  # saved back unchanged, so a released model keeps its scheduler
        self.pipe.scheduler = self.sample_scheduler
        self.unet.requires_grad_(False)
        for name in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
                module.eval()

    # ---- components -------------------------------------------------------------------------------------------
    @property
    def unet(self) -> UNet2DConditionModel:
        return self.pipe.unet

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.pixel_space else int(self.pipe.vae_scale_factor)

    @property
    def resolution(self) -> int:
        """Default image side in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def to(self, device: torch.device | str) -> Backbone:
        self.pipe.to(device)
        return self

    # ---- conditioning -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Text conditioning for each prompt (batch first)."""
        return self.text_cond(prompts)

    @abc.abstractmethod
    def text_cond(self, prompts: Sequence[str]) -> Cond:
        """:meth:`encode_prompts` with gradients through the text encoders (textual inversion, prompt attacks)."""

    def null_cond(self, n: int) -> Cond:
        """The unconditional (empty prompt) conditioning repeated ``n`` times, as the pipeline uses for CFG."""
        one = self.encode_prompts([""])
        return {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in one.items()}

    @abc.abstractmethod
    def unet_kwargs(self, cond: Cond) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward`` for a conditioning."""

    def predict_noise(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, unet: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """ε-prediction of ``unet`` (default: the backbone's own) at noisy inputs ``x_t`` and timesteps ``t``."""
        net = self.unet if unet is None else unet
        return net(x_t, t, **self.unet_kwargs(cond), return_dict=False)[0]

    # ---- images <-> model space -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B,3,H,W]`` in [0,1] -> model-space tensors (VAE latents, or pixels in [-1,1])."""
        x = images.to(self.device, self.dtype) * 2 - 1
        if self.pixel_space:
            return x
        vae = self.pipe.vae
        latents = vae.encode(x.to(vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space tensors -> images ``[B,3,H,W]`` in [0,1]."""
        if self.pixel_space:
            return ((latents.float() + 1) / 2).clamp(0, 1)
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]
        return ((x.float() + 1) / 2).clamp(0, 1)

    # ---- sampling through the real pipeline -------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        steps: int = 25,
        guidance: float = 7.5,
        negative_prompt: str | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 16,
        seeds: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Images ``[N,3,H,W]`` in [0,1] for ``prompts`` via the pipeline's DDIM sampler; seeded per image.

        Image ``i`` uses generator seed ``seed + i`` (or ``seeds[i]`` when given) so a sample does not depend on
        the batch it falls in; ``seeds`` lets several prompt sets share one batched call.
        """
        height = height or self.resolution
        width = width or self.resolution
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError("one seed per prompt")
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            gens = [torch.Generator("cpu").manual_seed(seed + start + i if seeds is None else seeds[start + i])
                    for i in range(len(chunk))]
            kwargs = dict(
                prompt=chunk,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                output_type="latent",
            )
            if negative_prompt:
                kwargs["negative_prompt"] = [negative_prompt] * len(chunk)
            if self.cond_edit is not None:  # a prompt attack edits the text conditioning itself
                kwargs.update(self.pipe_embeds(self.cond_edit(self.encode_prompts(kwargs.pop("prompt")))))
            latents = self._call_pipe(kwargs)
            out.append(self.decode(latents).cpu())
        return torch.cat(out) if out else torch.empty(0, 3, height, width)

    def _call_pipe(self, kwargs: dict) -> torch.Tensor:
        return self.pipe(**kwargs).images

    cond_edit: Callable[[Cond], Cond] | None = None
    """When set, :meth:`sample` encodes the prompts, passes the conditioning through this function and samples
    from the result (the pipeline still builds the unconditional branch itself); see :meth:`editing_cond`."""

    @contextlib.contextmanager
    def editing_cond(self, edit: Callable[[Cond], Cond]) -> Iterator[None]:
        """Within the block, :meth:`sample` uses ``edit(encode_prompts(prompts))`` as the prompts' conditioning."""
        self.cond_edit = edit
        try:
            yield
        finally:
            self.cond_edit = None

    def pipe_embeds(self, cond: Cond) -> dict:
        """Pipeline keyword arguments passing a conditioning instead of prompts."""
        return {"prompt_embeds": cond["encoder_hidden_states"]}

    # ---- parameters ------------------------------------------------------------------------------------------
    def named_trainable(self, subset: str = "full", unet: torch.nn.Module | None = None) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` pairs of the UNet that belong to ``subset`` (see :data:`TRAINABLE_SUBSETS`)."""
        net = self.unet if unet is None else unet
        for name, p in net.named_parameters():
            if _in_subset(name, subset):
                yield name, p

    def set_trainable(self, subset: str = "full") -> list[torch.nn.Parameter]:
        """Freeze the UNet except ``subset``; return the trainable parameters."""
        self.unet.requires_grad_(False)
        params = [p for _, p in self.named_trainable(subset)]
        if not params:
            raise UserError(f"trainable subset {subset!r} selects no UNet parameter of {self.source}")
        for p in params:
            p.requires_grad_(True)
        return params

    # ---- saving -----------------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, records: dict[str, dict] | None = None) -> Path:
        """Write a standard diffusers folder atomically (built beside ``out_dir``, then renamed over it).

        ``records`` are extra JSON files written at the folder's root first (e.g. ``unlearn``'s provenance), so the
        weights and their description appear together."""
        from metaunlearn.atomic import ensure_dir, make_temp_dir, replace_directory

        out_dir = Path(out_dir)
        ensure_dir(out_dir.parent)
        tmp = make_temp_dir(out_dir.parent, f".{out_dir.name}.")
        try:
            self.pipe.scheduler = self.original_scheduler
            try:
                self.pipe.save_pretrained(tmp, safe_serialization=True)
            except Exception as exc:  # safetensors reports a full disk as SafetensorError, not OSError
                if is_io_error(exc):
                    raise as_os_error(exc, out_dir) from None
                raise
            finally:
                self.pipe.scheduler = self.sample_scheduler
            if self.pixel_space:
                (tmp / MARKER_FILE).write_text(json.dumps({"pixel_space": True}) + "\n")
            for name, record in (records or {}).items():
                (tmp / name).write_text(json.dumps(record, indent=2) + "\n")
            replace_directory(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out_dir
