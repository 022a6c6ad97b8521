"""Reduced-precision release weights: the attacker loads the UNet quantized, as 8-bit inference and QLoRA do.

Erasures and meta-unlearning defences move weights by small amounts; rounding every weight to a coarse grid can
round such a change away (or land the model somewhere the defence never looked at). An attack kind with
``quantize`` rounds the weight of every ``Linear`` and ``Conv2d`` layer of the UNet before anything else happens:
its step 0 is the quantized model itself, and any finetuning steps train on top of it (with ``mode: lora`` that is
QLoRA's setting: a frozen quantized base plus trainable adapters; with ``mode: full`` the rounded weights are the
starting point of full-precision finetuning).

Rounding is symmetric absmax round-to-nearest with ``bits`` bits (integer levels −2^(b−1) … 2^(b−1)−1, the scale
of a group its largest magnitude over 2^(b−1)−1): per output channel (``block_size: null``, LLM.int8's row-wise
absmax) or per block of ``block_size`` consecutive weights (bitsandbytes' 4-bit formats use blocks of 64),
computed with :func:`torch.fake_quantize_per_channel_affine` on the weight seen as (groups × group size). Biases,
norms and embeddings keep full precision. The original weights are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from metaunlearn.attacks.kind_settings import QuantizeSettings


def fake_quantize(weight: torch.Tensor, bits: int, block_size: int | None) -> torch.Tensor:
    """``weight`` rounded to ``bits``-bit symmetric absmax levels per output channel or per block (same shape,
    same dtype)."""
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    if block_size is None:
        groups = w.reshape(w.shape[0], -1)
    else:
        flat = w.reshape(-1)
        pad = (-flat.numel()) % block_size
        groups = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block_size)
    scale = (groups.abs().amax(dim=1) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.zeros(groups.shape[0], dtype=torch.int32, device=w.device)
    rounded = torch.fake_quantize_per_channel_affine(groups, scale, zero, 0, -qmax - 1, qmax)
    if block_size is not None:
        rounded = rounded.reshape(-1)[: w.numel()]
    return rounded.reshape(weight.shape).to(weight.dtype)


@torch.no_grad()
def quantize_unet_(unet: torch.nn.Module, settings: QuantizeSettings) -> Callable[[], None]:
    """Round the UNet's Linear and Conv2d weights in place; return a function that puts the originals back."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for module in unet.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            weight = module.weight
            saved.append((weight, weight.detach().to("cpu", copy=True)))
            weight.copy_(fake_quantize(weight, settings.bits, settings.block_size))

    @torch.no_grad()
    def restore() -> None:
        for weight, original in saved:
            weight.copy_(original.to(weight.device))
        saved.clear()

    return restore
