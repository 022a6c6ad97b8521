"""The chunked, twice-differentiable attention of the Hessian-vector products: exact first and second derivatives
(gradcheck / gradgradcheck in float64, against PyTorch's math kernel), no attention matrix kept in the graph, the
same Hessian-vector product of a whole UNet, and reverse mode running on it with the processors restored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import metaunlearn.meta.attention as attention_module
from metaunlearn.meta import AttackConfig, MetaConfig, MetaObjective
from metaunlearn.meta.attention import attention, twice_differentiable_attention
from tests.test_meta import WEIGHTS, make_backbone, meta_data

# rows of 3 queries per chunk for the (2, 3, 7, 5) shapes below (the last chunk is a partial one)
SMALL_CHUNK = 2 * 3 * 5 * 4 * 3


def qkv(queries=7, keys=5, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, dim, generator=g, dtype=torch.float64, requires_grad=True)
            for n in (queries, keys, keys)]


def masks():
    g = torch.Generator().manual_seed(1)
    boolean = torch.rand(2, 1, 7, 5, generator=g) > 0.4
    boolean[..., 0] = True  # no fully masked row
    return {"none": None, "additive": torch.randn(7, 5, generator=g, dtype=torch.float64), "boolean": boolean}


@pytest.mark.parametrize("mask", ["none", "additive", "boolean"])
def test_gradcheck_and_gradgradcheck(mask):
    m = masks()[mask]
    if m is not None:  # q, k, v (1, 2, 5|4, 3): 2 rows per chunk, the last one partial
        m = m[..., :5, :4] if m.dim() == 2 else m[:1, :, :5, :4]
    inputs = [t.detach()[:1, :2, :n, :3].requires_grad_() for t, n in zip(qkv(), (5, 4, 4))]

    def fn(q, k, v):
        return attention(q, k, v, attn_mask=m, scale=0.4 if mask == "additive" else None, chunk_bytes=1 * 2 * 4 * 4 * 2,
                         small_bytes=0)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def _hvp(fn, inputs):
    out = fn(*inputs)
    loss = out.sin().sum()
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    dot = sum((g * g.detach().cos()).sum() for g in grads)
    return [g.detach() for g in grads], list(torch.autograd.grad(dot, inputs))


@pytest.mark.parametrize("mask", ["none", "additive", "boolean"])
def test_equals_the_math_kernel_to_second_order(mask):
    m = masks()[mask]
    inputs = qkv()
    with sdpa_kernel([SDPBackend.MATH]):
        ref = _hvp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m), inputs)
    ours = _hvp(lambda q, k, v: attention(q, k, v, attn_mask=m, chunk_bytes=SMALL_CHUNK, small_bytes=0), inputs)
    for a, b in zip(ours[0] + ours[1], ref[0] + ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _saved_shapes(fn, inputs):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
        torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
    return shapes


def test_the_double_backward_graph_holds_no_attention_matrix():
    inputs = qkv(queries=48, keys=40, dim=8)
    with sdpa_kernel([SDPBackend.MATH]):  # control: the math kernel keeps queries × keys matrices
        assert any(s[-2:] == (48, 40) for s in _saved_shapes(F.scaled_dot_product_attention, inputs))
    shapes = _saved_shapes(lambda q, k, v: attention(q, k, v, chunk_bytes=SMALL_CHUNK, small_bytes=0), inputs)
    assert shapes and not any(s[-2:] in {(48, 40), (40, 48)} for s in shapes)


def test_unet_hessian_vector_product_equals_the_math_kernel():
    backbone = make_backbone("sd", torch.float64)
    unet = backbone.unet
    data = meta_data(backbone, n=2)
    params = [p for p in unet.parameters()]
    for p in params:
        p.requires_grad_(True)
    original = {name: type(p) for name, p in unet.attn_processors.items()}
    g = torch.Generator().manual_seed(0)
    latents = data.forget_train.latents
    noise = torch.randn(latents.shape, generator=g, dtype=latents.dtype)
    t = torch.tensor([10, 500])
    cond = data.forget_train.cond["encoder_hidden_states"]
    vector = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]

    def hvp():
        loss = (unet(latents + noise, t, cond).sample - noise).pow(2).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
        dot = sum((gr * v).sum() for gr, v in zip(grads, vector))
        return torch.autograd.grad(dot, params, allow_unused=True, materialize_grads=True)

    with sdpa_kernel([SDPBackend.MATH]):
        ref = hvp()
    calls = []
    with twice_differentiable_attention(unet, chunk_bytes=4096, small_bytes=0):
        assert all(isinstance(p, attention_module.TwiceDifferentiableAttnProcessor)
                   for p in unet.attn_processors.values())
        with _counting(calls):
            ours = hvp()
    assert calls  # the UNet's attention ran through the chunked kernel
    assert {name: type(p) for name, p in unet.attn_processors.items()} == original
    num = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(ours, ref)))
    assert float(num / torch.sqrt(sum((b**2).sum() for b in ref))) < 1e-10


class _counting:
    """Count the calls of the chunked attention function."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __enter__(self):
        self.original = attention_module.attention

        def counted(*args, **kwargs):
            self.calls.append(1)
            return self.original(*args, **kwargs)

        attention_module.attention = counted

    def __exit__(self, *exc):
        attention_module.attention = self.original


def test_reverse_mode_takes_its_hessian_vector_products_on_it():
    backbone = make_backbone("sd", torch.float64)
    data = meta_data(backbone, n=4)
    params = backbone.set_trainable("full")
    before = {name: type(p) for name, p in backbone.unet.attn_processors.items()}
    attack = AttackConfig(steps=2, batch_size=2, lr=1e-2)
    config = MetaConfig(attacks=[attack], batch_size=2, order="second", **WEIGHTS)
    objective = MetaObjective(backbone, config, data, params)
    plan = objective.plan(torch.Generator().manual_seed(0))
    calls = []
    with _counting(calls):
        objective.accumulate(0, torch.Generator(), plan)
    objective.close()
    assert calls
    assert {name: type(p) for name, p in backbone.unet.attn_processors.items()} == before
    assert all(torch.isfinite(p.grad).all() for p in params)


def test_small_attention_runs_the_math_kernel(monkeypatch):
    """A call whose attention matrix is at most ``small_bytes`` is PyTorch's math kernel (the same derivatives); a
    larger one the chunked kernel."""
    chunked = []
    apply = attention_module._Attention.apply
    monkeypatch.setattr(attention_module._Attention, "apply", lambda *a: chunked.append(1) or apply(*a))
    inputs = qkv(queries=48, keys=40, dim=8)
    matrix = 2 * 3 * 48 * 40 * 4
    assert matrix <= attention_module.SMALL_BYTES
    with sdpa_kernel([SDPBackend.MATH]):
        ref = _hvp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), inputs)
    ours = _hvp(lambda q, k, v: attention(q, k, v), inputs)
    assert not chunked
    for a, b in zip(ours[0] + ours[1], ref[0] + ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    _hvp(lambda q, k, v: attention(q, k, v, chunk_bytes=SMALL_CHUNK, small_bytes=matrix - 1), inputs)
    assert chunked
