"""Memory-efficient attention that is exactly twice differentiable, for the Hessian-vector products of reverse mode.

PyTorch's fused attention kernels (flash, memory-efficient) have no double backward, and its math kernel keeps the
heads × queries × keys attention matrices of every layer in the graph of a double backward: at SD-1.4's 64×64
latents (4096 tokens, 8 heads) 512 MiB each, several per layer. Here

* the forward runs the fused kernel under no_grad and saves only q, k, v;
* the backward (dq, dk, dv from q, k, v and dO) is itself an autograd function (:class:`_AttentionBackward`) that
  works through the queries in row chunks — each chunk holds whole rows, so its softmax is exact —
  S = s·q_c kᵀ (+ mask), P = softmax(S), dV += Pᵀ dO_c, dP = dO_c vᵀ, dS = P∘(dP − rowsum(dP∘P)), dq_c = s·dS k,
  dK += s·dSᵀ q_c, and saves only q, k, v, dO;
* its own backward (the double backward) recomputes one chunk at a time in plain differentiable torch ops and
  back-propagates through it, so no attention matrix outlives its chunk;
* a call whose whole attention matrix is small (:data:`SMALL_BYTES`) runs the math kernel instead, which costs less.

So a first backward with ``create_graph=True`` keeps q, k, v and dO per layer (4 activation-sized tensors) and the
double backward needs about eight chunk-sized matrices at a time (:data:`CHUNK_BYTES` each). Low-precision inputs
are computed in float32 inside a chunk. Third and higher derivatives are not provided (the double backward's
graph is not recorded).

:func:`twice_differentiable_attention` sets :class:`TwiceDifferentiableAttnProcessor` on a diffusers model's
attention modules that run PyTorch's SDPA processor and restores the previous processors afterwards; attention
modules with other processors keep them (and run on the math kernel, which the context also selects).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CHUNK_BYTES = 32 * 2**20
"""Bytes of one batch × heads × rows × keys matrix of a query chunk (float32 inside the chunk)."""

SMALL_BYTES = 4 * 2**20
"""A call whose whole batch × heads × queries × keys matrix (float32) is at most this many bytes runs PyTorch's math
kernel instead: its double-backward graph is a few such matrices — negligible — and it costs less compute than the
chunked recomputation (the toy model's attention: 1 MiB at batch 8; SD-1.4 at 64×64 latents: 512 MiB)."""

_FUSED_FIRST = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                SDPBackend.MATH]


def _rows_per_chunk(q: torch.Tensor, k: torch.Tensor, chunk_bytes: int) -> int:
    per_row = math.prod(q.shape[:-2]) * k.shape[-2] * 4
    return max(1, min(q.shape[-2], chunk_bytes // max(per_row, 1)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _mask_rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., rows, :]


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _chunk_grads(q_c, k, v, do_c, mask_c, scale: float):
    """dq_c and this chunk's shares of dk, dv, in differentiable torch ops (inputs already in the compute dtype)."""
    s = torch.matmul(q_c, k.transpose(-2, -1)) * scale
    if mask_c is not None:
        s = s + mask_c
    p = torch.softmax(s, dim=-1)
    dv = torch.matmul(p.transpose(-2, -1), do_c)
    dp = torch.matmul(do_c, v.transpose(-2, -1))
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, k) * scale
    dk = torch.matmul(ds.transpose(-2, -1), q_c) * scale
    return dq, dk, dv


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient of a broadcast tensor (k, v shared across a batch or heads) back to its shape."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    grad = grad.sum(dim=tuple(range(lead))) if lead else grad
    dims = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


class _AttentionBackward(torch.autograd.Function):
    """(q, k, v, dO) ↦ (dq, dk, dv) of softmax attention, chunked over query rows; differentiable once more."""

    @staticmethod
    def forward(ctx, q, k, v, do, mask, scale, chunk_bytes):
        ctx.save_for_backward(q, k, v, do)
        ctx.mask, ctx.scale, ctx.chunk_bytes = mask, scale, chunk_bytes
        dtype = _compute_dtype(q.dtype)
        kc, vc = k.to(dtype), v.to(dtype)
        shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.zeros(*shape, *k.shape[-2:], dtype=dtype, device=k.device)
        dv = torch.zeros(*shape, *v.shape[-2:], dtype=dtype, device=v.device)
        additive = _additive(mask, dtype)
        n = _rows_per_chunk(q, k, chunk_bytes)
        for start in range(0, q.shape[-2], n):
            rows = slice(start, start + n)
            dq_c, dk_c, dv_c = _chunk_grads(q[..., rows, :].to(dtype), kc, vc, do[..., rows, :].to(dtype),
                                            _mask_rows(additive, rows), scale)
            dq[..., rows, :] = dq_c
            dk += dk_c
            dv += dv_c
        return dq, _reduce_to(dk, k.shape).to(k.dtype), _reduce_to(dv, v.shape).to(v.dtype)

    @staticmethod
    def backward(ctx, gdq, gdk, gdv):
        q, k, v, do = ctx.saved_tensors
        dtype = _compute_dtype(q.dtype)
        additive = _additive(ctx.mask, dtype)
        grads = [torch.zeros(t.shape, dtype=dtype, device=t.device) for t in (q, k, v, do)]
        gq, gk, gv, gdo = grads
        n = _rows_per_chunk(q, k, ctx.chunk_bytes)
        zero = lambda t: torch.zeros((), dtype=dtype, device=q.device) if t is None else t.to(dtype)  # noqa: E731
        gdq, gdk, gdv = zero(gdq), zero(gdk), zero(gdv)
        for start in range(0, q.shape[-2], n):
            rows = slice(start, start + n)
            with torch.enable_grad():
                inputs = [q[..., rows, :].detach().to(dtype).requires_grad_(), k.detach().to(dtype).requires_grad_(),
                          v.detach().to(dtype).requires_grad_(), do[..., rows, :].detach().to(dtype).requires_grad_()]
                dq_c, dk_c, dv_c = _chunk_grads(*inputs, _mask_rows(additive, rows), ctx.scale)
                outer = [gdq.expand_as(dq_c) if gdq.dim() == 0 else gdq[..., rows, :],
                         gdk.expand_as(dk_c), gdv.expand_as(dv_c)]
                parts = torch.autograd.grad((dq_c, dk_c, dv_c), inputs, outer, allow_unused=True)
            for target, part, sliced in zip(grads, parts, (True, False, False, True)):
                if part is None:
                    continue
                part = _reduce_to(part, target[..., rows, :].shape if sliced else target.shape)
                if sliced:
                    target[..., rows, :] += part
                else:
                    target += part
        return (gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), gdo.to(do.dtype), None, None, None)


class _Attention(torch.autograd.Function):
    """softmax(s·q kᵀ + mask) v: the fused kernel forward, :class:`_AttentionBackward` as the backward."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, chunk_bytes):
        with sdpa_kernel(_FUSED_FIRST):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v)
        ctx.mask, ctx.scale, ctx.chunk_bytes = mask, scale, chunk_bytes
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = _AttentionBackward.apply(q, k, v, do, ctx.mask, ctx.scale, ctx.chunk_bytes)
        return dq, dk, dv, None, None, None


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              scale: float | None = None, chunk_bytes: int = CHUNK_BYTES, small_bytes: int = SMALL_BYTES) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (no dropout, not causal) with a chunked, twice-differentiable backward
    (calls whose attention matrix is at most ``small_bytes``: PyTorch's math kernel, twice differentiable as well).

    ``attn_mask``: boolean (True = attend) or additive, broadcastable to (…, queries, keys); it gets no gradient."""
    if attn_mask is not None and attn_mask.requires_grad:
        raise ValueError("twice-differentiable attention: the attention mask must not require grad")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
    if math.prod(lead) * query.shape[-2] * key.shape[-2] * 4 <= small_bytes:
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
    return _Attention.apply(query, key, value, attn_mask, scale, chunk_bytes)


class TwiceDifferentiableAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with :func:`attention` in place of PyTorch's SDPA."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, small_bytes: int = SMALL_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self.small_bytes = small_bytes

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = attention(query, key, value, attn_mask=attention_mask, chunk_bytes=self.chunk_bytes,
                                  small_bytes=self.small_bytes)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _replaceable(processor) -> bool:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return type(processor) in (AttnProcessor2_0, AttnProcessor)


@contextmanager
def twice_differentiable_attention(model: torch.nn.Module, chunk_bytes: int = CHUNK_BYTES,
                                   small_bytes: int = SMALL_BYTES):
    """Within the context, ``model``'s standard attention runs :class:`TwiceDifferentiableAttnProcessor` (other
    processors keep theirs, on PyTorch's math kernel); the previous processors come back on exit."""
    with sdpa_kernel([SDPBackend.MATH]):
        original = dict(getattr(model, "attn_processors", {}))
        if not original:
            yield
            return
        processor = TwiceDifferentiableAttnProcessor(chunk_bytes, small_bytes)
        model.set_attn_processor({name: processor if _replaceable(p) else p for name, p in original.items()})
        try:
            yield
        finally:
            model.set_attn_processor(original)
