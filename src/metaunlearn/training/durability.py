"""Cheap durability signals of a model under unlearning: how easily a finetuning attack could undo the erasure.

Measured on the UNet parameters an attacker would finetune (all of them by default), with L_f the denoising loss on
a fixed batch of the forget set and L_r the same on the related set (the same examples, noise and timesteps at
every measurement, so values are comparable along training and across models):

* ``sig_forget_grad_norm`` — ‖∇L_f(θ)‖: a small gradient means the first attack steps move slowly;
* ``sig_forget_related_cos`` — cos(∇L_f, ∇L_r): the meta objective's self-destruct mechanism pushes this below 0
  (a finetuning step that lowers L_f then raises L_r);
* ``sig_forget_top_eig`` — the top Hessian eigenvalue of L_f, by power iteration on Hessian-vector products
  (double backward, math attention): sharp curvature means steps of a fixed size change L_f a lot;
* ``sig_distance`` — ‖θ − θ_ref‖ from reference weights (the original model when given, else the stage's start).

:class:`DurabilityProbe` is built once per stage and called every ``signals.every`` training steps (logged in the
training log) and once on the final model (``signals.json`` next to it; the report correlates these with the
measured post-attack forget rate across models).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field
from torch.nn.attention import SDPBackend, sdpa_kernel

from metaunlearn.backbones.base import TRAINABLE_SUBSETS, Backbone
from metaunlearn.config import StrictModel
from metaunlearn.data.cache import CachedSet
from metaunlearn.training.draws import draw, subset_index

SIGNALS_FILE = "signals.json"


class SignalsConfig(StrictModel):
    """Section ``unlearn.signals``: durability signals in the training log and ``signals.json``."""

    every: int = Field(20, ge=0, description="log the signals every N training steps (0: only on the final model)")
    batch_size: int = Field(8, ge=1, description="examples of the fixed forget / related batches")
    power_iterations: int = Field(
        4, ge=0, description="Hessian-vector products for the top eigenvalue (0 skips it: no double backward)"
    )
    subset: str = Field("full", description=f"UNet parameters measured: one of {', '.join(TRAINABLE_SUBSETS)}")
    seed: int = Field(0, description="seed of the fixed batches, noise and the power iteration's start vector")
    reference: Path | None = Field(
        None, description="model folder sig_distance is measured from (default: the weights the stage starts from)"
    )


def _flat_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _norm(a: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(_flat_dot(a, a))


class DurabilityProbe:
    """Durability signals of ``backbone.unet`` (see the module docstring)."""

    def __init__(
        self,
        backbone: Backbone,
        config: SignalsConfig,
        forget: CachedSet,
        related: CachedSet | None = None,
        reference: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.backbone = backbone
        self.config = config
        self.forget, self.related = forget, related
        names = [n for n, _ in backbone.named_trainable(config.subset)]
        self.names = names
        params = dict(backbone.unet.named_parameters())
        # reference weights (on CPU): given, or the weights right now (the stage's start)
        self.reference = {n: (reference[n] if reference is not None else params[n].detach()).to("cpu", copy=True)
                          for n in names}
        gen = torch.Generator().manual_seed(config.seed)
        steps = backbone.num_train_timesteps
        self.forget_draw = draw(forget, subset_index(len(forget), config.batch_size, gen), steps, gen)
        self.related_draw = (draw(related, subset_index(len(related), config.batch_size, gen), steps, gen)
                             if related is not None and len(related) else None)
        self.start_seed = config.seed + 1

    def _params(self) -> list[torch.nn.Parameter]:
        params = dict(self.backbone.unet.named_parameters())
        return [params[n] for n in self.names]

    def __call__(self) -> dict[str, float]:
        """The signals at the current weights (the UNet's ``requires_grad`` flags and ``.grad`` are left as found)."""
        unet = self.backbone.unet
        params = self._params()
        flags = [p.requires_grad for p in params]
        saved_grads = [p.grad for p in params]
        was_training = unet.training
        unet.eval()
        out: dict[str, float] = {}
        try:
            for p in params:
                p.requires_grad_(True)
            with torch.no_grad():
                out["sig_distance"] = float(torch.sqrt(sum(
                    ((p.detach().to("cpu", torch.float64) - self.reference[n].double()) ** 2).sum()
                    for n, p in zip(self.names, params))))
            with sdpa_kernel([SDPBackend.MATH]):
                need_graph = self.config.power_iterations > 0
                loss = self.forget_draw.loss(self.backbone, self.forget)
                g_f = torch.autograd.grad(loss, params, create_graph=need_graph, allow_unused=True,
                                          materialize_grads=True)
                out["sig_forget_loss"] = float(loss.detach())
                out["sig_forget_grad_norm"] = float(_norm([g.detach() for g in g_f]))
                if self.related_draw is not None:
                    loss_r = self.related_draw.loss(self.backbone, self.related)
                    g_r = torch.autograd.grad(loss_r, params, allow_unused=True, materialize_grads=True)
                    denom = _norm([g.detach() for g in g_f]) * _norm(g_r)
                    cos = _flat_dot([g.detach() for g in g_f], g_r) / denom if float(denom) > 0 else torch.zeros(())
                    out["sig_forget_related_cos"] = float(cos)
                if need_graph:
                    out["sig_forget_top_eig"] = self._top_eigenvalue(params, g_f)
        finally:
            for p, flag, grad in zip(params, flags, saved_grads):
                p.requires_grad_(flag)
                p.grad = grad
            unet.train(was_training)
        return out

    def _top_eigenvalue(self, params: list[torch.nn.Parameter], g_f: Sequence[torch.Tensor]) -> float:
        """Power iteration ``v ← Hv / ‖Hv‖`` from a seeded random start; the Rayleigh quotient ``vᵀHv`` at the end
        (the eigenvalue of largest magnitude, usually the top one)."""
        gen = torch.Generator().manual_seed(self.start_seed)
        v = [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype) for p in params]
        scale = 1 / float(_norm(v))
        v = [x * scale for x in v]
        value = 0.0
        n = self.config.power_iterations
        for i in range(n):
            hv = torch.autograd.grad(g_f, params, grad_outputs=v, retain_graph=i < n - 1, allow_unused=True,
                                     materialize_grads=True)
            value = float(_flat_dot(v, hv))
            norm = float(_norm(hv))
            if norm == 0:
                return 0.0
            v = [h.detach() / norm for h in hv]
        return value


def reference_weights(model_dir) -> dict[str, torch.Tensor]:
    """The UNet weights of a diffusers folder (safetensors only), by parameter name."""
    from metaunlearn.backbones.loading import load_backbone

    backbone = load_backbone(model_dir, device=torch.device("cpu"))
    return {n: p.detach() for n, p in backbone.unet.named_parameters()}
