"""The method-agnostic meta-unlearning objective, and the plain objective it reduces to.

Per outer step, with L(θ; D) the denoising loss (:func:`metaunlearn.training.denoise.denoising_loss`) on a batch of
a cached set, θ the trained UNet parameters and θ' = A(θ) a simulated attack (finetuning on forget-train):

    g = α ∇L_base(θ) + γ_ir ∇L(θ; irrelevant) + γ_rel ∇L(θ; related)
        − β_f ∇L(θ'; forget-test) − β_rel ∇L(θ'; related) − β_ir ∇L(θ'; irrelevant)

First order (default): the gradients at θ' are applied to θ. Second order: exact, through the inner steps, by
reverse mode (:mod:`metaunlearn.meta.reverse`; ``second_fd`` with finite-difference Hessian-vector products), or
by the full unroll kept as a reference (:mod:`metaunlearn.meta.unrolled`). Then ‖g‖ is clipped and the outer optimizer steps.

The objective knows nothing about the base method: it receives an optional ``base_loss`` callable
``(step, generator) -> (loss, terms)`` (ESD, SDD) or none (after a UCE/RECE edit); α = ``base_weight`` 0 leaves it
out too ("retain + meta only", e.g. continuing from an already-erased plain model).

Data parallel (``torchrun`` / ``accelerate launch``, :mod:`metaunlearn.training.parallel`): every process draws the
same :class:`~metaunlearn.meta.plan.StepPlan`, computes the retain, inner-attack and ascent losses on its share of
each batch, and the gradients are summed across processes — the inner gradients at every simulated step too (so
every process simulates the same attacker; inside the autograd graph under the second order), and g before the clip
— so the update equals the one-process update at the same global batch. The base loss is computed alike on every
process and counted once.

Cost per step, by construction: the base loss, one forward+backward per retain term, the attack's inner steps
(forward+backward each, in place, no copies of the UNet, no new optimizers), one forward+backward per ascent term,
and two ``_foreach_copy_`` of the attacked parameters. Data come from cached latents and conditioning. A relative
ascent bound (``ascent_cap_ratio``) adds one no-grad forward per ascent term at θ before the attack (or at the start
weights θ0, ``ascent_cap_reference: start``): the loss its cap is a multiple of.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial

import torch

from metaunlearn.backbones.base import Backbone
from metaunlearn.meta.config import MetaConfig
from metaunlearn.meta.plan import MetaData, OuterTerm, StepPlan, make_plan
from metaunlearn.meta.reverse import Trajectory, reverse_meta_gradient
from metaunlearn.meta.simulated_attack import AttackRunner, set_requires_grad, space_key
from metaunlearn.meta.start_weights import StartWeights
from metaunlearn.meta.unrolled import second_order_ascent
from metaunlearn.training.parallel import SINGLE, Shard

BaseLossFn = Callable[[int, torch.Generator], tuple[torch.Tensor, dict[str, float]]]

RETAIN_WEIGHTS = {"irrelevant": "gamma_irrelevant", "related": "gamma_related"}
ASCENT_WEIGHTS = {"forget_test": "beta_forget", "related": "beta_related", "irrelevant": "beta_irrelevant"}


def autocast_factory(device: torch.device, mixed_precision: str) -> Callable[[], AbstractContextManager]:
    """A context factory: bf16 autocast on ``device`` for ``mixed_precision == "bf16"``, else a no-op."""
    if mixed_precision == "bf16":
        return partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


def _zero_grads(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def clip_and_step(
    params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer | None, clip: float | None
) -> float:
    """Clip the gradient (if ``clip``), step ``optimizer`` (if given); return the norm before clipping."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(with_grad, clip if clip is not None else float("inf"))
    if optimizer is not None:
        optimizer.step()
    return float(norm)


def _ascended(weight: float, bound: Callable[[torch.Tensor], torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """An ascent term's contribution to the minimised objective: ``−β·B(L)``."""
    return -weight * bound(loss)


def _bounded_slope(config: MetaConfig, weight: float, cap: float, value: float) -> float:
    """d(−β·B(L))/dL at the loss value ``value`` for bound ``cap``."""
    return -weight * config.bound_slope(value, cap)


def _descended(weight: float, loss: torch.Tensor) -> torch.Tensor:
    """A descent term's contribution (the anchored forget term): ``+β·L``."""
    return weight * loss


class PlainObjective:
    """The base method alone: ``g = ∇L_base(θ)``."""

    def __init__(self, params: Sequence[torch.nn.Parameter], base_loss: BaseLossFn, clip_grad_norm: float | None = None,
                 autocast: Callable[[], AbstractContextManager] = nullcontext, shard: Shard = SINGLE) -> None:
        self.params = list(params)
        self.base_loss = base_loss
        self.clip_grad_norm = clip_grad_norm
        self.autocast = autocast
        self.shard = shard

    def accumulate(self, step: int, generator: torch.Generator) -> dict[str, float]:
        """The base loss's gradient; with several processes each computes it alike and the copies are averaged
        (the base loss draws from the shared stream; averaging keeps the processes from drifting apart)."""
        _zero_grads(self.params)
        with self.autocast():
            loss, terms = self.base_loss(step, generator)
        if self.shard.distributed:
            loss = self.shard.replicated * loss
        loss.backward()
        self.shard.sum_grads_(self.params)
        return dict(terms)

    def step(self, step: int, generator: torch.Generator, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        terms = self.accumulate(step, generator)
        terms["grad_norm"] = clip_and_step(self.params, optimizer, self.clip_grad_norm)
        if hasattr(self.base_loss, "after_step"):
            self.base_loss.after_step()
        return terms

    def close(self) -> None:
        pass


class MetaObjective:
    """The meta objective over ``params`` (the outer trainable parameters) on ``backbone.unet``.

    ``params`` must be captured before this object is built (LoRA attacks insert adapter parameters into the UNet).
    ``base_params`` (default: ``params``) are the parameters the base loss trains, when the meta terms train more.
    Call :meth:`close` before saving the model (removes LoRA adapters).
    """

    def __init__(
        self,
        backbone: Backbone,
        config: MetaConfig,
        data: MetaData,
        params: Sequence[torch.nn.Parameter],
        *,
        base_loss: BaseLossFn | None = None,
        base_params: Sequence[torch.nn.Parameter] | None = None,
        seed: int = 0,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        shard: Shard = SINGLE,
    ) -> None:
        self.backbone = backbone
        self.config = config
        self.data = data
        self.params = list(params)
        self.base_loss = base_loss if config.base_weight > 0 else None  # α = 0: not even computed
        # the base loss's gradient reaches only these (a subset of params; default: all of them)
        self.base_params = list(base_params) if base_params is not None else None
        self.autocast = autocast
        self.shard = shard
        self._check_data()
        self.attacks = (
            AttackRunner(backbone, config.attacks, seed=seed, offload=config.offload)
            if config.needs_attack else None
        )
        # one gradient record per attack parameter space (a distribution may mix the full UNet, subsets, LoRA)
        self.trajectories: dict[tuple, Trajectory] = {}
        # anchor_to / ascent_cap_reference start: θ0, the trained parameters now, before any outer step (and before a
        # resume's checkpoint)
        self.start = StartWeights(backbone.unet, self.params, shard) if config.needs_start_weights else None
        set_requires_grad(self.params, True)

    def _check_data(self) -> None:
        for weights in (RETAIN_WEIGHTS, ASCENT_WEIGHTS):
            for role, attr in weights.items():
                if getattr(self.config, attr) > 0:
                    self.data.get(role)
        if self.config.needs_attack:
            for attack in self.config.attacks:
                self.data.get(attack.data)

    def plan(self, generator: torch.Generator) -> StepPlan:
        """Draw the random numbers of one step (see :mod:`metaunlearn.meta.plan`)."""
        return make_plan(self.config, self.data, self.backbone.num_train_timesteps, generator)

    def accumulate(self, step: int, generator: torch.Generator, plan: StepPlan | None = None) -> dict[str, float]:
        """Fill the outer parameters' ``.grad`` with the (unclipped) meta gradient g; return the loss terms.

        The attack and the ascent terms run first, while ``.grad`` is still empty, so the attack's peak memory
        (saved θ, inner moments, inner gradients) never coincides with a held outer gradient; the base loss and the
        retain terms at the restored θ then accumulate on top. With several processes, each computes its share of
        every batch and g (and the logged values) are summed across them at the end.
        """
        plan = plan if plan is not None else self.plan(generator)
        _zero_grads(self.params)
        terms: dict[str, float] = {}
        if plan.attack is not None:
            terms.update(self._ascent(plan))
        if self.base_loss is not None:
            with self.autocast():
                loss, base_terms = self.base_loss(step, generator)
            once = self.shard.replicated  # every process computes the same base loss: count it once
            (self.config.base_weight * once * loss).backward(inputs=self.base_params)
            terms.update({k: once * v for k, v in base_terms.items()})
        for role, draw in plan.retain.items():
            terms[f"retain_{role}"] = self._backward(draw, self.data.get(role), getattr(self.config, RETAIN_WEIGHTS[role]))
        self.shard.sum_grads_(self.params)
        return self.shard.sum_values(terms)

    def _backward(self, draw, data, weight: float) -> float:
        """``weight · ∇L(draw)`` into ``.grad`` from this process's share of the batch; returns its share of L."""
        value = 0.0
        for part, share in draw.shares(self.shard):
            with self.autocast():
                loss = part.loss(self.backbone, data)
            (weight * share * loss).backward()
            value += share * float(loss.detach())
        return value

    def _outer_terms(self, plan: StepPlan) -> list[OuterTerm]:
        """The terms scored at the attacked weights: ``−β·B(L(θ_k; D))`` per ascent set (B: ``ascent_bound`` with
        bound c: ``ascent_cap``, or ``ascent_cap_ratio`` × L(θ; the same draw), the whole batch's loss at θ now,
        before the attack runs — or at the start weights θ0 with ``ascent_cap_reference: start``), and with
        ``forget_term: anchor`` the forget set's ``+β_f·‖ε_θk − sg ε_anchor‖²`` instead, its target predicted before
        the attack runs at θ (``anchor_to: current``) or at the start weights θ0 (``start``)."""
        cfg = self.config
        terms = []
        for role, draw in plan.ascent.items():
            weight, data = getattr(cfg, ASCENT_WEIGHTS[role]), self.data.get(role)
            if role == "forget_test" and cfg.forget_term == "anchor":
                unet = self.start.predictor() if cfg.anchors_to_start else None
                anchored = draw.anchored(self.backbone, data, self.shard, self.autocast, unet=unet)
                terms.append(OuterTerm(f"anchor_{role}", anchored, data, partial(_descended, weight)))
                continue
            if cfg.ascent_bound == "none":
                terms.append(OuterTerm(f"ascent_{role}", draw, data, partial(_ascended, weight, cfg.bounded)))
                continue
            reference = None
            if cfg.relative_cap:
                unet = self.start.predictor() if cfg.caps_from_start else None
                reference = draw.batch_loss(self.backbone, data, self.shard, self.autocast, unet=unet)
            cap = cfg.cap_for(reference)
            slope = partial(_bounded_slope, cfg, weight, cap)
            terms.append(OuterTerm(f"ascent_{role}", draw, data, partial(_ascended, weight, partial(cfg.bounded, cap=cap)),
                                   slope, cap))
        return terms

    def _ascent(self, plan: StepPlan) -> dict[str, float]:
        """The outer terms at θ' = A(θ), or averaged over the iterates θ_k of the trajectory (``ascent_along``), into
        ``.grad``; first order: at the attacked weights run in place, then θ restored."""
        cfg = self.config
        attack = plan.attack_config or cfg.attacks[plan.attack]
        outer = self._outer_terms(plan)
        train = self.data.get(attack.data)
        points = cfg.trajectory_points(len(plan.inner))
        # values every process holds alike are weighted so that the sum across processes logs them once
        once = self.shard.replicated
        terms: dict[str, float] = {"attack_lr": once * attack.lr, "attack_steps": once * len(plan.inner)}
        terms.update({term.name.replace("ascent_", "cap_", 1): once * term.cap for term in outer if term.cap is not None})
        if cfg.order in ("second", "second_fd"):
            terms.update(self._reverse(plan, attack, outer, train, points))
            return terms
        if cfg.order == "second_unrolled":
            space = self.attacks.space(plan.attack)
            terms.update(second_order_ascent(
                self.backbone, attack, space.params, self.params, plan.inner, train, outer, self.autocast, self.shard,
                points=points,
            ))
            return terms
        sums: dict[str, float] = {}

        def ascend(k: int) -> None:
            if k not in points:
                return
            set_requires_grad(self.params, True)
            for term in outer:
                value = 0.0
                for contribution, part_value in self._scored_parts(term, len(points)):
                    contribution.backward()
                    value += part_value
                sums[term.name] = sums.get(term.name, 0.0) + value

        try:
            hook = ascend if len(points) > 1 else None
            terms.update(self.attacks.run(plan.attack, plan.inner, train, frozen=self.params, autocast=self.autocast,
                                          shard=self.shard, config=attack, after_step=hook))
            if hook is None:
                ascend(len(plan.inner))
        finally:
            self.attacks.undo()
            set_requires_grad(self.params, True)
        terms.update({name: value / len(points) for name, value in sums.items()})
        return terms

    def _scored_parts(self, term: OuterTerm, points: int):
        """``term`` on this process's parts of its batch at the weights the UNet holds now: per part, its
        contribution to the minimised objective (÷ ``points``, the iterates scored) and its share of the loss value."""
        slope = term.split_slope(self.backbone, self.shard, self.autocast)
        for part, share in term.draw.shares(self.shard):
            with self.autocast():
                loss = part.loss(self.backbone, term.data)
            scored = term.score(share * loss) if slope is None else slope * share * loss
            yield scored / points, share * float(loss.detach())

    def _trajectory(self, attack) -> Trajectory:
        key = space_key(attack)
        if key not in self.trajectories:
            self.trajectories[key] = Trajectory("cpu" if self.config.offload else None)
        return self.trajectories[key]

    def _reverse(self, plan: StepPlan, attack, outer: list[OuterTerm], train, points: list[int]) -> dict[str, float]:
        """Exact second order by reverse mode: the outer terms are the outer loss at every iterate in ``points``
        (the end point only, or along the trajectory), injected at those inner steps."""
        terms: dict[str, float] = {}
        sums: dict[str, float] = {}

        def loss_at(k: int) -> torch.Tensor | None:
            if k not in points:
                return None
            total = None
            for term in outer:
                value = 0.0
                for contribution, part_value in self._scored_parts(term, len(points)):
                    total = contribution if total is None else total + contribution
                    value += part_value
                sums[term.name] = sums.get(term.name, 0.0) + value
            return total

        terms.update(reverse_meta_gradient(
            self.attacks, plan.attack, plan.inner, train, self.params, loss_at, trajectory=self._trajectory(attack),
            hvp="finite_difference" if self.config.order == "second_fd" else "double_backward",
            fd_eps=self.config.fd_eps, autocast=self.autocast, shard=self.shard, config=attack,
        ))
        terms.update({name: value / len(points) for name, value in sums.items()})
        return terms

    def step(self, step: int, generator: torch.Generator, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One outer step: accumulate g, clip, ``optimizer.step()``, then the base loss's ``after_step``."""
        terms = self.accumulate(step, generator)
        terms["grad_norm"] = clip_and_step(self.params, optimizer, self.config.clip_grad_norm)
        if self.base_loss is not None and hasattr(self.base_loss, "after_step"):
            self.base_loss.after_step()
        return terms

    def close(self) -> None:
        """Remove LoRA adapters (if any) so the UNet is a plain diffusers model again."""
        if self.attacks is not None:
            self.attacks.close()
