"""Every random choice of one outer meta step, drawn up front from the run's generator.

A :class:`StepPlan` holds which attack was sampled, the batches/noise/timesteps of every inner attack step, and the
draws of every retain (at θ) and ascent (at θ') term. Drawing it before any computation makes a step reproducible,
makes common random numbers trivial (the same :class:`Draw` object at θ and θ'), and lets tests recompute a meta
gradient by hand from exactly the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from metaunlearn.backbones.base import Backbone
from metaunlearn.data.cache import CachedSet
from metaunlearn.errors import UserError
from metaunlearn.meta.config import AttackConfig, MetaConfig
from metaunlearn.training.draws import Draw, draw, subset_index  # noqa: F401  (also importable from here)
from metaunlearn.training.parallel import Shard

ROLES = ("forget_train", "forget_test", "related", "irrelevant")


@dataclass
class MetaData:
    """The cached data sets the meta objective reads (a set whose terms all have weight 0 may be ``None``).

    ``attack_sets`` are further forget sets a simulated attack may finetune on (``AttackConfig.data`` names one).
    """

    forget_train: CachedSet | None = None
    forget_test: CachedSet | None = None
    related: CachedSet | None = None
    irrelevant: CachedSet | None = None
    attack_sets: dict[str, CachedSet] = field(default_factory=dict)

    def get(self, role: str) -> CachedSet:
        data = getattr(self, role) if role in ROLES else self.attack_sets.get(role)
        if data is None or len(data) == 0:
            raise UserError(f"the meta objective needs the '{role}' data set (empty or not given)")
        return data


@dataclass
class OuterTerm:
    """A term of the meta objective scored at attacked weights θ_k: its log ``name``, batch ``draw`` of ``data``,
    and ``score``, which maps the batch loss to its signed contribution to the minimised objective (an ascent term:
    ``−β·B(L)``; the anchored forget term: ``+β·L``)."""

    name: str
    draw: Draw
    data: CachedSet
    score: Callable[[torch.Tensor], torch.Tensor]
    slope: Callable[[float], float] | None = None
    """d score / dL as a function of the loss value, for a score that is not linear in L (a bounded ascent term):
    a batch split into parts (micro-batches, processes) is then scored ``slope(L)·part`` with L the whole batch's
    loss, whose gradient summed over the parts is the whole batch's ∇score(L) (the bound acts on the batch's loss,
    not on each part's)."""
    cap: float | None = None
    """The bound c this term's loss is scored against (logged), fixed for the outer step: with a relative cap, the
    ratio times the unattacked model's loss on ``draw``, so every iterate of the trajectory uses the same c."""

    def split_slope(self, backbone: Backbone, shard: Shard, autocast, unet=None) -> float | None:
        """``slope(L)`` at the whole batch's loss L when this term is nonlinear and its batch is split (a no-grad
        pass over this process's parts, summed across processes — every process calls it alike), else ``None``."""
        if self.slope is None or not (shard.distributed or shard.micro > 1):
            return None
        return self.slope(self.draw.batch_loss(backbone, self.data, shard, autocast, unet=unet))


@dataclass
class StepPlan:
    """The random numbers of one outer step (see the module docstring)."""

    attack: int | None = None
    attack_config: AttackConfig | None = None  # the sampled attack with its drawn lr and steps
    inner: list[Draw] = field(default_factory=list)
    retain: dict[str, Draw] = field(default_factory=dict)
    ascent: dict[str, Draw] = field(default_factory=dict)


def inner_indices(n: int, attack: AttackConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """Batches of the attack: successive shuffled epochs cut into ``batch_size`` chunks (last one may be short).

    With ``steps`` set, exactly that many full-or-short batches from as many epochs as needed; otherwise
    ``epochs`` whole passes.
    """
    per_epoch = math.ceil(n / attack.batch_size)
    total = attack.steps if attack.steps is not None else attack.epochs * per_epoch
    out: list[torch.Tensor] = []
    while len(out) < total:
        perm = torch.randperm(n, generator=generator)
        out.extend(perm[i : i + attack.batch_size] for i in range(0, n, attack.batch_size))
    return out[:total]


def make_plan(config: MetaConfig, data: MetaData, num_train_timesteps: int, generator: torch.Generator) -> StepPlan:
    """Draw every random number of one outer step, in a fixed order."""
    plan = StepPlan()
    retain = {"irrelevant": config.gamma_irrelevant, "related": config.gamma_related}
    for role, weight in retain.items():
        if weight > 0:
            d = data.get(role)
            plan.retain[role] = draw(d, subset_index(len(d), config.batch_size, generator), num_train_timesteps, generator)
    if not config.needs_attack:
        return plan
    weights = torch.tensor([a.weight for a in config.attacks], dtype=torch.float64)
    plan.attack = int(torch.multinomial(weights, 1, generator=generator)) if len(weights) > 1 else 0
    attack = plan.attack_config = config.attacks[plan.attack].sample(generator)
    train = data.get(attack.data)
    for index in inner_indices(len(train), attack, generator):
        plan.inner.append(draw(train, index, num_train_timesteps, generator, attack.timestep))
    ascent = {"forget_test": config.beta_forget, "related": config.beta_related, "irrelevant": config.beta_irrelevant}
    for role, weight in ascent.items():
        if weight <= 0:
            continue
        if config.common_random_numbers and role in plan.retain:
            plan.ascent[role] = plan.retain[role]
        else:
            d = data.get(role)
            plan.ascent[role] = draw(d, subset_index(len(d), config.batch_size, generator), num_train_timesteps, generator)
    return plan
