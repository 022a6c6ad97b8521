"""Exact second-order meta-gradient by reverse mode through the simulated attack (``meta.order: second``).

Notation: x are the attack's variables (a UNet subset, or LoRA adapters), z the outer parameters the attack does
not move (they still shape every inner loss), x_0 = x at θ (adapters: their start values), and step k of the
attack is x_k = U_k(x_{k-1}, clip(∇_x L_k(x_{k-1}, z))) with U_k the AdamW/SGD update. The outer objective is

    F = Σ_k  ℓ_k(x_k, z),   k = 0 … M

where ℓ_M holds the ascent terms (−Σ β L(θ'; D)) and any ℓ_k (k < M) is an optional loss *injected along the
trajectory* (:data:`TrajectoryLoss`; e.g. ascent accumulated over the inner steps).

1. Forward: the attack runs in place (fused attention, no graph across steps), recording the clipped gradients
   ĝ_1 … ĝ_M it applies (:class:`Trajectory`; copies in the parameters' dtype, on the host by default, so device
   memory does not grow with M; M parameter copies of host memory).
2. ℓ_M is back-propagated at x_M: its x-gradient seeds the adjoint ā_x, its z-gradient accumulates in ``z.grad``.
3. For k = M … 1: x_{k-1} and the optimizer state after k-1 steps are rebuilt bit-identically by replaying the
   optimizer from the saved θ with ĝ_1 … ĝ_{k-1} (elementwise work only, O(M²) parameter passes in total, no UNet
   evaluation), the optimizer adjoint (:mod:`metaunlearn.meta.adjoints`) gives u = adjoint of ĝ_k, the clip
   adjoint turns it into w, and one Hessian-vector product of the inner loss
   L_k — one double backward with the UNet's attention on the chunked, twice-differentiable kernel of
   :mod:`metaunlearn.meta.attention`, or a central finite difference of two gradients
   (``second_fd``) — adds H_xx w to ā_x and H_zx w to ``z.grad``. ℓ_{k-1} (if injected) adds its gradients.
4. ā_x is the gradient with respect to x_0; where x_0 is part of θ it becomes those parameters' ``.grad``.

After the reverse pass the UNet holds x_0 again (θ restored exactly from its saved copy).

Data parallel (``shard``, :mod:`metaunlearn.training.parallel`): every process evaluates its share of each inner
batch and of the ascent batches. The forward attack sums the inner gradients across processes, so ĝ_k are the
global ones; in reverse the adjoint seed ā_x, the inner gradient the clip's adjoint needs, and every H_xx w are
summed across processes, so ā_x is the same everywhere (the main process alone adds it to ``.grad``); the
z-gradients stay per-process shares until the meta objective sums ``.grad`` at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

from metaunlearn.backbones.base import Backbone
from metaunlearn.data.cache import CachedSet
from metaunlearn.meta.adjoints import clip_adjoint_, optimizer_adjoint
from metaunlearn.meta.attention import twice_differentiable_attention
from metaunlearn.meta.config import AttackConfig
from metaunlearn.meta.plan import Draw
from metaunlearn.meta.simulated_attack import AttackRunner, set_requires_grad
from metaunlearn.training.parallel import SINGLE, Shard

TrajectoryLoss = Callable[[int], torch.Tensor | None]
"""``loss_at(k)``: a scalar term of the outer objective evaluated by the UNet as it stands (parameters x_k), or
``None``; called for k = M first, then k = M-1 … 0. It is minimised: ascent terms come with a minus sign. Under data
parallelism it is this process's share; for k < M it must be ``None`` on every process or on none (a process without
rows returns a zero that depends on x), since its gradient is summed across processes."""


class Trajectory:
    """The clipped gradients ĝ_1 … ĝ_M one attack applied, in reusable buffers on ``device`` (None: the
    parameters' device)."""

    def __init__(self, device: str | torch.device | None) -> None:
        self.device = device
        self.buffers: list[list[torch.Tensor]] = []
        self.count = 0

    def reset(self) -> None:
        self.count = 0

    @torch.no_grad()
    def record(self, grads: Sequence[torch.Tensor]) -> None:
        if self.count == len(self.buffers):
            device = self.device
            pin = device is not None and torch.device(device).type == "cpu" and grads[0].device.type == "cuda"
            self.buffers.append([torch.empty(g.shape, dtype=g.dtype, device=device or g.device, pin_memory=pin)
                                 for g in grads])
        torch._foreach_copy_(self.buffers[self.count], list(grads))
        self.count += 1

    def __getitem__(self, k: int) -> list[torch.Tensor]:
        """ĝ_k for 1 ≤ k ≤ M."""
        return self.buffers[k - 1]

    def release(self) -> None:
        self.buffers.clear()
        self.count = 0


def _loss_grads(loss: torch.Tensor, xs: list[torch.Tensor], zs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Back-propagate ``loss`` into ``z.grad`` (accumulating) and return its x-gradient (zeros where unused)."""
    for x in xs:
        x.grad = None
    loss.backward(inputs=xs + zs)
    out = []
    for x in xs:
        out.append(x.grad if x.grad is not None else torch.zeros_like(x))
        x.grad = None
    return out


def _accumulate(loss: torch.Tensor, xs: list[torch.Tensor], zs: list[torch.Tensor], adj_x: list[torch.Tensor]) -> None:
    """Back-propagate ``loss``: its x-gradient is added to ``adj_x`` in place (autograd accumulates into an existing
    ``.grad`` one tensor at a time, so no model-sized gradient is allocated), its z-gradient to ``z.grad``."""
    for x, a in zip(xs, adj_x):
        x.grad = a
    try:
        loss.backward(inputs=xs + zs)
    finally:
        for x in xs:
            x.grad = None


def _hvp_double_backward(inner_loss, xs, zs, weight_fn, autocast, accumulate, attention=nullcontext) -> None:
    """One double backward: g = ∇_x L (with graph), w = weight_fn(g), then ``accumulate(g · w)`` (H_xx w into ā_x,
    H_zx w into ``z.grad``); ``attention()``: the context that makes the model's attention twice differentiable."""
    with attention():
        with autocast():
            loss = inner_loss()
        grads = torch.autograd.grad(loss, xs, create_graph=True, allow_unused=True, materialize_grads=True)
        del loss
        w = weight_fn([g.detach() for g in grads])
        dot = sum(torch.vdot(g.reshape(-1), v.reshape(-1).to(g.dtype)) for g, v in zip(grads, w))
        del grads
        if not dot.requires_grad:  # no inner-loss rows on this process: still join the other processes' sums
            dot = sum((x * 0.0).sum() for x in xs)
        accumulate(dot)


def _hvp_finite_difference(inner_loss, xs, zs, weight_fn, autocast, accumulate, eps: float, need_gradient: bool = True):
    """Central difference: H w ≈ (∇L(x + h w) − ∇L(x − h w)) / 2h with h = eps·‖x‖/‖w‖ (a relative step ``eps``
    of the parameters); fused attention throughout. Error: O(eps²) truncation (the third derivative of L along w)
    plus O(ulp/eps) rounding. The gradient at x itself is taken only if ``need_gradient`` (the clip's adjoint).
    ``accumulate`` receives the two scaled losses (H_xx w into ā_x, H_zx w into ``z.grad``)."""
    if need_gradient:
        with autocast():
            loss = inner_loss()
        grads = list(torch.autograd.grad(loss, xs, allow_unused=True, materialize_grads=True))
        del loss
    else:
        grads = None
    w = weight_fn(grads)
    del grads
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in w])))
    if norm == 0.0:
        return
    scale = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x.detach()) for x in xs])))
    h = eps * max(scale, 1.0) / norm
    for sign in (1.0, -1.0):
        with torch.no_grad():
            torch._foreach_add_(xs, w, alpha=sign * h)
        with autocast():
            loss = inner_loss()
        accumulate(loss * (sign / (2 * h)))
        del loss
        with torch.no_grad():
            torch._foreach_add_(xs, w, alpha=-sign * h)


def reverse_meta_gradient(
    runner: AttackRunner,
    index: int,
    draws: Sequence[Draw],
    train: CachedSet,
    outer_params: Sequence[torch.nn.Parameter],
    loss_at: TrajectoryLoss,
    *,
    trajectory: Trajectory,
    hvp: str = "double_backward",
    fd_eps: float = 1e-3,
    autocast=nullcontext,
    shard: Shard = SINGLE,
    config: AttackConfig | None = None,
) -> dict[str, float]:
    """Accumulate dF/dθ (see the module docstring) into ``outer_params``' ``.grad``; return the attack's losses.

    ``runner.attacks[index]`` is the attack (``config``: as sampled for this step, with its drawn lr); ``draws`` its
    inner batches; the UNet is left at θ.
    """
    config = config if config is not None else runner.attacks[index]
    backbone: Backbone = runner.backbone
    space = runner.space(index)
    xs = list(space.params)
    x_ids = {id(x) for x in xs}
    zs = [p for p in outer_params if id(p) not in x_ids]
    outer_x = {id(p) for p in outer_params} & x_ids
    trajectory.reset()
    try:
        terms = runner.run(index, draws, train, frozen=outer_params, autocast=autocast,
                           on_gradient=lambda k, grads: trajectory.record(grads), shard=shard, config=config)
        optimizer = space.optimizers[space.key(config)]
        set_requires_grad(xs + zs, True)
        loss = loss_at(len(draws))
        adj_x = _loss_grads(loss, xs, zs) if loss is not None else [torch.zeros_like(x) for x in xs]
        del loss
        shard.sum_(adj_x)
        adjoint = optimizer_adjoint(config, optimizer, len(draws))

        def accumulate(loss: torch.Tensor) -> None:
            """∂loss/∂x into ā_x (summed over processes), ∂loss/∂z into ``z.grad``."""
            if shard.distributed:
                part = _loss_grads(loss, xs, zs)
                shard.sum_(part)
                torch._foreach_add_(adj_x, part)
            else:
                _accumulate(loss, xs, zs, adj_x)

        for k in range(len(draws), 0, -1):
            scratch = [torch.empty_like(x) for x in xs]
            with torch.no_grad():  # x_{k-1} and state_{k-1}, bit-identical to the forward pass
                torch._foreach_copy_([x.detach() for x in xs], space.saved)
                optimizer.reset()
                for j in range(1, k):
                    torch._foreach_copy_(scratch, trajectory[j])
                    optimizer.step(scratch)
                torch._foreach_copy_(scratch, trajectory[k])
            u = adjoint.step_back(adj_x, scratch, *optimizer.state())
            del scratch
            optimizer.release()  # not needed again before the next replay: the HVP's peak goes without it
            draw = draws[k - 1]

            def weight_fn(grads: list[torch.Tensor] | None, u=u) -> list[torch.Tensor]:
                if grads is not None:
                    if shard.distributed:  # the clip acted on the whole batch's gradient
                        grads = [g.clone() for g in grads]
                        shard.sum_(grads)
                    clip_adjoint_(u, grads, config.clip_grad_norm)
                return u

            def inner_loss(draw=draw):
                total = None
                for part, share in draw.shares(shard):
                    loss = part.loss(backbone, train)
                    loss = loss if share == 1.0 else share * loss
                    total = loss if total is None else total + loss
                if total is None:  # none of this batch's rows here: a zero whose gradient still depends on x,
                    # so the Hessian-vector product runs (and joins the other processes' sums) here too
                    total = 0.0 * sum((x * x).sum() for x in xs)
                return total

            if hvp == "finite_difference":
                _hvp_finite_difference(inner_loss, xs, zs, weight_fn, autocast, accumulate, fd_eps,
                                       need_gradient=config.clip_grad_norm is not None)
            else:
                _hvp_double_backward(inner_loss, xs, zs, weight_fn, autocast, accumulate,
                                     attention=lambda: twice_differentiable_attention(backbone.unet))
            del u, weight_fn
            loss = loss_at(k - 1)
            if loss is not None:
                accumulate(loss)
            del loss
        optimizer.reset()
        del adjoint
        for x, a in zip(xs, adj_x):
            if id(x) in outer_x and shard.rank == 0:  # ā_x is the same everywhere: the main process holds it
                x.grad = a if x.grad is None else x.grad.add_(a)
    finally:
        set_requires_grad([x for x in xs if id(x) not in outer_x], False)
        set_requires_grad(list(outer_params), True)
        runner.undo()
    return terms
