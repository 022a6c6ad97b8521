"""The simulated relearning attack A(θ), run in place on the one UNet and undone afterwards.

No UNet is ever copied per outer step. Each distinct *parameter space* an attack trains (a UNet subset, or one
LoRA adapter configuration) owns, allocated once:

* a saved copy of its parameters (``torch._foreach_copy_`` in before the attack and back after it), and
* one :class:`~metaunlearn.meta.inner_optim.InnerOptimizer` per optimizer kind, whose state is zeroed per attack.

LoRA attacks (peft, through diffusers' ``add_adapter``) train only the adapters; the base weights stay put, and the
meta gradient at θ' is taken with the adapters active, which is exactly the gradient with respect to the merged
weights W + s·BA. Adapters are injected once (initialised under the run's seed), disabled outside the attack,
reset to their initial values after every attack, and removed by :meth:`AttackRunner.close` before saving, so the
saved model is a plain diffusers UNet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from metaunlearn.backbones.base import Backbone
from metaunlearn.data.cache import CachedSet
from metaunlearn.meta.config import AttackConfig
from metaunlearn.meta.inner_optim import InnerOptimizer, clip_by_global_norm_
from metaunlearn.meta.plan import Draw
from metaunlearn.training.parallel import SINGLE, Shard

Autocast = Callable[[], AbstractContextManager]
LORA_PREFIX = "meta_attack_"


def set_requires_grad(params: Sequence[torch.Tensor], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def _distinct(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` with any tensor sharing storage with an earlier one cloned: clipping and the optimizer modify
    them in place (autograd may hand the same tensor to two inputs of one operation)."""
    seen: set[int] = set()
    out = []
    for g in grads:
        ptr = g.untyped_storage().data_ptr()
        out.append(g.clone() if ptr in seen else g)
        seen.add(ptr)
    return out


class AttackSpace:
    """The parameters one kind of attack trains, their saved copy, and their inner optimizers."""

    def __init__(self, params: list[torch.nn.Parameter], adapter: str | None = None, offload: bool = False) -> None:
        self.params = params
        self.adapter = adapter
        self.offload = offload
        # adapters: their start values, now; a subset: θ, allocated at the first attack
        self.saved: list[torch.Tensor] = [p.detach().clone() for p in params] if adapter else []
        self.optimizers: dict[str, InnerOptimizer] = {}

    @staticmethod
    def key(config: AttackConfig) -> str:
        return config.optimizer if config.optimizer == "adamw" else f"sgd{config.momentum > 0}"

    def optimizer(self, config: AttackConfig) -> InnerOptimizer:
        key = self.key(config)
        if key not in self.optimizers:
            self.optimizers[key] = InnerOptimizer(self.params, config)
        opt = self.optimizers[key]
        opt.reset(config)
        return opt

    @torch.no_grad()
    def save(self) -> None:
        """Remember θ (not needed for adapters, whose start values never change)."""
        if self.adapter is None:
            if not self.saved:
                pin = self.offload and self.params[0].device.type == "cuda"
                device = "cpu" if self.offload else None
                self.saved = [torch.empty(p.shape, dtype=p.dtype, device=device or p.device, pin_memory=pin)
                              for p in self.params]
            torch._foreach_copy_(self.saved, [p.detach() for p in self.params])

    @torch.no_grad()
    def restore(self) -> None:
        torch._foreach_copy_([p.detach() for p in self.params], self.saved)


def space_key(config: AttackConfig) -> tuple:
    if config.trainable != "lora":
        return ("subset", config.trainable)
    return ("lora", config.lora_rank, config.lora_alpha or config.lora_rank, tuple(config.lora_targets))


class AttackRunner:
    """Runs any configured attack in place on ``backbone.unet`` (see the module docstring)."""

    def __init__(self, backbone: Backbone, attacks: Sequence[AttackConfig], seed: int = 0, offload: bool = False) -> None:
        """``offload``: keep the saved copy of θ in host memory (pinned when the UNet is on a GPU)."""
        self.backbone = backbone
        self.attacks = list(attacks)
        self.spaces: dict[tuple, AttackSpace] = {}
        # Subsets first, while parameter names are still those of the plain UNet.
        for config in self.attacks:
            key = space_key(config)
            if key[0] == "subset" and key not in self.spaces:
                params = [p for n, p in backbone.named_trainable(config.trainable) if "lora_" not in n]
                self.spaces[key] = AttackSpace(params, offload=offload)
        for config in self.attacks:
            key = space_key(config)
            if key[0] == "lora" and key not in self.spaces:
                self.spaces[key] = self._add_lora(config, f"{LORA_PREFIX}{len(self.spaces)}", seed)
        if self.has_lora:
            backbone.unet.disable_adapters()
        self.active: AttackSpace | None = None

    @property
    def has_lora(self) -> bool:
        return any(s.adapter for s in self.spaces.values())

    def _add_lora(self, config: AttackConfig, name: str, seed: int) -> AttackSpace:
        from peft import LoraConfig

        unet = self.backbone.unet
        flags = {p: p.requires_grad for p in unet.parameters()}
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha or config.lora_rank,
            target_modules=list(config.lora_targets),
            init_lora_weights=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet.add_adapter(lora, adapter_name=name)
        for p, flag in flags.items():  # peft freezes everything but the adapter; keep the stage's flags
            p.requires_grad_(flag)
        params = [p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n]
        set_requires_grad(params, False)
        return AttackSpace(params, adapter=name)

    def space(self, index: int) -> AttackSpace:
        return self.spaces[space_key(self.attacks[index])]

    def run(
        self,
        index: int,
        draws: Sequence[Draw],
        data: CachedSet,
        frozen: Sequence[torch.Tensor],
        autocast: Autocast = nullcontext,
        on_gradient: Callable[[int, list[torch.Tensor]], None] | None = None,
        shard: Shard = SINGLE,
        *,
        config: AttackConfig | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """Finetune in place (θ → θ'); ``frozen`` parameters get no gradient. Call :meth:`undo` afterwards.

        ``on_gradient(k, grads)`` (optional) sees the clipped gradient ĝ_k of inner step k = 1 … M before the
        optimizer consumes it. With several processes each computes its share of every inner batch and the inner
        gradients are summed across them before the clip and the update, so every process takes the same inner
        steps. The returned losses are this process's shares (the caller sums them). ``config`` is attack ``index``
        as sampled for this step (drawn lr and steps; default: as configured); ``after_step(k)`` is called with the
        k-th iterate θ_k live, e.g. to take ascent terms along the trajectory."""
        config = config if config is not None else self.attacks[index]
        space = self.space(index)
        space.save()
        self.active = space
        if space.adapter is not None:
            unet = self.backbone.unet
            unet.set_adapter(space.adapter)
            unet.enable_adapters()
        set_requires_grad(frozen, False)
        set_requires_grad(space.params, True)
        opt = space.optimizer(config)
        losses = []
        for k, draw in enumerate(draws, start=1):
            grads, value = None, 0.0
            for part, share in draw.shares(shard):
                with autocast():
                    loss = part.loss(self.backbone, data)
                if share != 1.0:
                    loss = share * loss
                value += float(loss.detach())
                piece = torch.autograd.grad(loss, space.params, allow_unused=True, materialize_grads=True)
                del loss
                if grads is None:
                    grads = _distinct(piece)
                else:
                    torch._foreach_add_(grads, list(piece))
                del piece
            losses.append(value)
            if grads is None:  # none of this batch's rows fell to this process
                grads = [torch.zeros_like(p) for p in space.params]
            shard.sum_(grads)
            clip_by_global_norm_(grads, config.clip_grad_norm)
            if on_gradient is not None:
                on_gradient(k, grads)
            opt.step(grads)
            del grads  # not held through the next forward pass (one parameter copy less at the peak)
            if after_step is not None:
                after_step(k)
                set_requires_grad(frozen, False)
                set_requires_grad(space.params, True)
        set_requires_grad(space.params, False)
        return {"attack_first": losses[0], "attack_last": losses[-1]} if losses else {}

    def undo(self) -> None:
        """θ' → θ (and adapters back to their start values, disabled)."""
        space, self.active = self.active, None
        if space is None:
            return
        space.restore()
        if space.adapter is not None:
            self.backbone.unet.disable_adapters()

    def close(self) -> None:
        """Remove every LoRA adapter from the UNet (before saving it)."""
        self.undo()
        if self.has_lora:
            self.backbone.unet.unload_lora()
            for key in [k for k, s in self.spaces.items() if s.adapter]:
                del self.spaces[key]
