"""Activation memory of one UNet pass, measured by tracing on PyTorch's ``meta`` device (no weights, no compute).

A forward + backward is traced as the bytes autograd saves (fused attention as what it saves: q, k, v, output,
log-sum-exp), times a factor for the backward pass's own temporaries (:data:`BACKWARD_FACTOR`, calibrated against
measured peaks with ``benchmarks/meta_order.py --parts``). The double backward of reverse mode (the chunked,
twice-differentiable attention of :mod:`metaunlearn.meta.attention`) is traced whole as the peak of live tensors
(:class:`~metaunlearn.meta.tensor_peak.TensorPeak`), which includes its transients (the attention chunks); the full
unroll's (math kernel) by the bytes it saves. Used by the memory plan (:mod:`metaunlearn.meta.memory`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from metaunlearn.meta.attention import twice_differentiable_attention as hvp_attention
from metaunlearn.meta.tensor_peak import TensorPeak

BACKWARD_FACTOR = {"fwd_bwd": 1.0, "double_backward": 1.0}
"""Peak activation memory of a pass / bytes autograd saves for it (calibrated; see the module docstring)."""


def parameter_bytes(tensors) -> int:
    """Bytes of ``tensors`` (parameters, buffers, gradients)."""
    return sum(t.numel() * t.element_size() for t in tensors)


class _FusedAttention(torch.autograd.Function):
    """What a fused (flash / memory-efficient) attention kernel saves for backward, on the meta device."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    return _FusedAttention.apply(query, key, value)


def activation_bytes(
    unet: torch.nn.Module,
    latent_shape: tuple[int, ...],
    cond_shapes: Mapping[str, tuple[int, ...]],
    *,
    batch: int,
    double_backward: bool = False,
    checkpointing: bool = False,
    dtype: torch.dtype = torch.float32,
    math_attention: bool = False,
) -> int:
    """Predicted peak activation memory of one UNet pass at ``batch`` (see the module docstring); a double backward
    runs the chunked attention of reverse mode, or PyTorch's math kernel (``math_attention``: the full unroll)."""
    from diffusers import UNet2DConditionModel
    import torch.nn.functional as F

    with torch.device("meta"):
        net = UNet2DConditionModel.from_config(unet.config).to(dtype)
    if checkpointing:
        net.enable_gradient_checkpointing()
    net.train()
    params = [p for p in net.parameters()]
    seen = {p.untyped_storage()._cdata for p in params}  # weights (and views of them) are not activations
    saved = [0]

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in seen:  # each storage once, however many views of it are saved
            seen.add(storage._cdata)
            saved[0] += storage.nbytes()
        return t

    x = torch.empty(batch, *latent_shape, device="meta", dtype=dtype)
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    cond = {k: torch.empty(batch, *shape, device="meta", dtype=dtype if k != "time_ids" else dtype)
            for k, shape in cond_shapes.items()}
    kwargs = {}
    if "text_embeds" in cond:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    if double_backward and not math_attention:
        return _live_double_backward(net, params, x, t, cond["encoder_hidden_states"], kwargs)
    original = F.scaled_dot_product_attention
    if not double_backward:
        F.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(x, t, cond["encoder_hidden_states"], **kwargs).sample
            loss = out.float().pow(2).mean()
            if double_backward:
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
                saved_first = saved[0]
                dot = sum(torch.vdot(g.reshape(-1), g.detach().reshape(-1)) for g in grads)
                del dot
                total = saved_first
            else:
                total = saved[0]
    finally:
        F.scaled_dot_product_attention = original
    return int(total * BACKWARD_FACTOR["double_backward" if double_backward else "fwd_bwd"])


def _live_double_backward(net, params, x, t, encoder_hidden_states, kwargs) -> int:
    """Reverse mode's double backward (chunked attention), traced on the meta device as the peak of live tensors
    (:class:`~metaunlearn.meta.tensor_peak.TensorPeak`: the saved graph and the transients, e.g. the attention chunks
    of the double backward) minus one gradient-sized set, which the plan counts itself (the graph gradient g)."""
    with hvp_attention(net), TensorPeak("meta") as tracker:
        loss = net(x, t, encoder_hidden_states, **kwargs).sample.float().pow(2).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
        del loss
        dot = sum(torch.vdot(g.reshape(-1), g.detach().reshape(-1)) for g in grads)
        del grads
        hv = torch.autograd.grad(dot, params, allow_unused=True, materialize_grads=True)
        del dot, hv
    return int((tracker.peak - tracker.start - parameter_bytes(params)) * BACKWARD_FACTOR["double_backward"])
