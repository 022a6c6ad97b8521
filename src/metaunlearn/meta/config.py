"""Configuration of the meta objective and of the simulated attack(s) it differentiates through.

Library defaults: retain γ = 1 on both benign sets, ascent β_f = 0.1, β_rel = 0.1, β_ir = 0.01, first order — the
ratios the official scripts probably meant, with retain weights strong enough to hold benign concepts in place (a
proxy run of the official weights, γ_ir 0.1 / γ_rel 0.01, collapsed the model before any attack).
On the toy world these first-order settings did not slow relearning; the demo uses exact second order with γ = 2,
β = 1/1/0.1 and 5 inner AdamW steps (docs/results.md, "How the meta settings were chosen"). Second order is computed in
reverse mode (:mod:`metaunlearn.meta.reverse`): memory of about 1.5 first-order steps plus host-side snapshots.

The official simulated attack is one epoch of AdamW (lr 1e-5, clip 1.0, weight decay 1e-4, fresh state every
outer step) over forget-train at batch 10 on the full UNet: ``AttackConfig()``'s defaults.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from metaunlearn.backbones.base import TRAINABLE_SUBSETS
from metaunlearn.config import StrictModel

ATTACK_SUBSETS = (*TRAINABLE_SUBSETS, "lora")


class AttackConfig(StrictModel):
    """One simulated relearning attack A(θ): finetuning on a forget set, run in place each outer step.

    ``lr_range`` and ``steps_range`` make the attack a family: each outer step that samples this attack draws its
    learning rate log-uniformly from ``lr_range`` and its step count uniformly from ``steps_range`` (inclusive), so
    one entry can bracket a threat ("AdamW, 1e-4 to 1e-3, 3 to 8 steps"). ``radius`` replaces the learning rate by a
    normalised step: every inner update is the optimizer's direction rescaled to a fixed L2 norm ρ.
    """

    weight: float = Field(1.0, gt=0, description="sampling weight when several attacks form a distribution")
    steps: int | None = Field(None, ge=1, description="inner optimizer steps (overrides epochs)")
    steps_range: tuple[int, int] | None = Field(
        None, description="[min, max] inner steps, drawn uniformly (inclusive) per outer step; overrides steps/epochs"
    )
    epochs: int = Field(1, ge=1, description="passes over forget-train when steps is not set")
    batch_size: int = Field(10, ge=1)
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw (decoupled weight decay) or sgd (with momentum > 0: SGD with heavy-ball momentum)"
    )
    lr: float = Field(1e-5, gt=0, description="inner learning rate (unused with radius; replaced by lr_range)")
    lr_range: tuple[float, float] | None = Field(
        None, description="[min, max] learning rate, drawn log-uniformly per outer step; overrides lr"
    )
    radius: float | None = Field(
        None, gt=0,
        description="normalised step: each inner update is the optimizer's direction rescaled to this L2 norm",
    )
    data: str = Field(
        "forget_train",
        description="the set the attack finetunes on: forget_train or a name in the unlearn stage's data.attack_sets",
    )
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    clip_grad_norm: float | None = Field(1.0, gt=0, description="per inner step; null disables")
    trainable: Literal[ATTACK_SUBSETS] = Field("full", description="UNet subset finetuned, or lora adapters")  # type: ignore[valid-type]
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float | None = Field(None, gt=0, description="default: the rank (scale 1)")
    lora_targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    timestep: int | None = Field(None, ge=0, description="fixed training timestep; null = uniform random")

    @field_validator("lr_range", "steps_range")
    @classmethod
    def _ordered_range(cls, value):
        if value is not None and not 0 < value[0] <= value[1]:
            raise ValueError("a range is [min, max] with 0 < min <= max")
        return value

    def sample(self, generator) -> AttackConfig:
        """This attack with ``lr`` and ``steps`` drawn from their ranges (itself when it has none)."""
        import torch

        update = {}
        if self.lr_range is not None:
            lo, hi = (math.log(v) for v in self.lr_range)
            update["lr"] = math.exp(lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64)))
        if self.steps_range is not None:
            lo, hi = self.steps_range
            update["steps"] = int(torch.randint(lo, hi + 1, (), generator=generator))
        return self.model_copy(update=update) if update else self

    @property
    def max_lr(self) -> float:
        """The highest learning rate this attack can draw."""
        return self.lr_range[1] if self.lr_range is not None else self.lr


class MetaConfig(StrictModel):
    """The meta objective (see :mod:`metaunlearn.meta.objective`)."""

    base_weight: float = Field(
        1.0, ge=0, description="weight α of the base method's loss; 0 leaves it out (retain and meta terms only)"
    )
    gamma_irrelevant: float = Field(1.0, ge=0, description="retain weight on irrelevant data at θ")
    gamma_related: float = Field(1.0, ge=0, description="retain weight on related data at θ")
    beta_forget: float = Field(0.1, ge=0, description="ascent weight on forget-test at θ' = A(θ)")
    beta_related: float = Field(0.1, ge=0, description="ascent weight on related data at θ'")
    beta_irrelevant: float = Field(0.01, ge=0, description="ascent weight on irrelevant data at θ'")
    clip_grad_norm: float | None = Field(1.0, gt=0, description="clip of the total outer gradient; null disables")
    batch_size: int = Field(8, ge=1, description="batch of each retain/ascent term")
    common_random_numbers: bool = Field(
        True, description="same batch, noise and timesteps for a data set at θ and at θ'"
    )
    trainable: Literal[TRAINABLE_SUBSETS] | None = Field(  # type: ignore[valid-type]
        None,
        description="UNet subset the meta terms train (default: the method's; the base loss keeps the method's)",
    )
    order: Literal["first", "second", "second_fd", "second_unrolled"] = Field(
        "first",
        description="first: dθ'/dθ ≈ I; second: exact, reverse mode; second_fd: finite-difference HVP; second_unrolled",
    )
    fd_eps: float = Field(
        1e-3, gt=0, description="second_fd: relative step of the central difference, h = fd_eps·‖x‖/‖w‖"
    )
    offload: bool = Field(
        True, description="keep the saved θ and second-order inner gradients in host memory (no effect on CPU)"
    )
    attacks: list[AttackConfig] = Field(
        default_factory=lambda: [AttackConfig()], min_length=1,
        description="the simulated attack, or a distribution of them: one is drawn per outer step by weight",
    )
    ascent_along: Literal["end", "trajectory"] = Field(
        "end",
        description="end: ascent terms at θ' only; trajectory: their mean over every trajectory_stride-th iterate",
    )
    trajectory_stride: int = Field(1, ge=1, description="with ascent_along trajectory: every k-th inner step")
    ascent_bound: Literal["none", "cap", "tanh"] = Field(
        "none",
        description="bound on each ascent loss: cap min(L, c), tanh c·tanh(L/c); c from ascent_cap or ascent_cap_ratio",
    )
    ascent_cap: float | None = Field(
        None, gt=0, description="absolute bound c of ascent_bound, in this model's denoising-loss units",
    )
    ascent_cap_ratio: float | None = Field(
        None, gt=0,
        description="relative bound of ascent_bound: c = ratio × the unattacked model's loss on the term's same draw",
    )
    ascent_cap_reference: Literal["current", "start"] = Field(
        "current",
        description="with ascent_cap_ratio, whose loss c multiplies: current (θ, this outer step) or start (θ0)",
    )
    forget_term: Literal["ascent", "anchor"] = Field(
        "ascent",
        description="ascent: the paper's −β_f·L(θ'; forget-test); anchor: +β_f·‖ε_θ' − sg ε_θ‖² on forget-test",
    )
    anchor_to: Literal["current", "start"] = Field(
        "current",
        description="with forget_term anchor, whose predictions are the target: current (ε_θ) or start (ε_θ0, fixed)",
    )

    @model_validator(mode="after")
    def _second_order_support(self) -> MetaConfig:
        if self.order == "second_unrolled" and any(a.trainable == "lora" for a in self.attacks):
            raise ValueError("order 'second_unrolled' supports UNet-subset attacks only, not lora")
        if self.order in ("second", "second_fd") and any(a.radius is not None for a in self.attacks):
            raise ValueError("a radius attacker is differentiated by order 'first' or 'second_unrolled' only")
        if self.ascent_bound != "none" and (self.ascent_cap is None) == (self.ascent_cap_ratio is None):
            raise ValueError(
                f"ascent_bound '{self.ascent_bound}' needs exactly one of ascent_cap (absolute) and ascent_cap_ratio "
                f"(relative to the unattacked model's loss); set the other to null"
            )
        if self.anchor_to != "current" and self.forget_term != "anchor":
            raise ValueError(f"anchor_to '{self.anchor_to}' applies to forget_term 'anchor' only")
        if self.ascent_cap_reference != "current" and not self.relative_cap:
            raise ValueError(
                f"ascent_cap_reference '{self.ascent_cap_reference}' applies to a relative bound only (ascent_bound "
                f"'cap' or 'tanh' with ascent_cap_ratio)"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_later_defaults(self, handler):
        # options that came after runs were recorded are left out of the dump at their defaults (anchor_to 'current',
        # no ascent_cap_ratio, ascent_cap_reference 'current'), so the settings (and settings keys) of every stage made
        # before them are unchanged
        out = handler(self)
        if isinstance(out, dict):
            for key in ("anchor_to", "ascent_cap_reference"):
                if out.get(key) == "current":
                    del out[key]
            if out.get("ascent_cap_ratio", 0) is None:
                del out["ascent_cap_ratio"]
        return out

    @property
    def relative_cap(self) -> bool:
        """Whether each ascent term's cap is ``ascent_cap_ratio`` × an unattacked model's loss on its draw (θ at this
        outer step, or θ0 with ``ascent_cap_reference: start``)."""
        return self.ascent_bound != "none" and self.ascent_cap_ratio is not None

    def bound_description(self) -> str:
        """``ascent_bound`` and its cap in words, e.g. ``cap 0.05`` or ``cap 2.5 × the start model's loss``."""
        if not self.relative_cap:
            return f"{self.ascent_bound} {self.ascent_cap:g}"
        reference = "start model's loss" if self.ascent_cap_reference == "start" else "unattacked loss"
        return f"{self.ascent_bound} {self.ascent_cap_ratio:g} × the {reference}"

    def cap_for(self, reference: float | None = None) -> float | None:
        """The bound c of an ascent term: ``ascent_cap``, or ``ascent_cap_ratio · reference`` with ``reference`` the
        unattacked model's loss on the term's draw; ``None`` without a bound."""
        if self.ascent_bound == "none":
            return None
        if self.ascent_cap_ratio is None:
            return self.ascent_cap
        if reference is None:
            raise ValueError("a relative ascent cap needs the unattacked model's loss on the draw")
        return self.ascent_cap_ratio * reference

    def bounded(self, loss, cap: float | None = None):
        """The ascent loss after ``ascent_bound`` with bound ``cap`` (default ``ascent_cap``; a tensor; unchanged
        for 'none')."""
        import torch

        cap = self.ascent_cap if cap is None else cap
        if self.ascent_bound == "cap":
            return torch.clamp(loss, max=cap)
        if self.ascent_bound == "tanh":
            return cap * torch.tanh(loss / cap) if cap > 0 else 0.0 * loss
        return loss

    def bound_slope(self, value: float, cap: float | None = None) -> float:
        """dB/dL of ``ascent_bound`` with bound ``cap`` (default ``ascent_cap``) at the loss value ``value`` (1 for
        'none')."""
        import math

        cap = self.ascent_cap if cap is None else cap
        if self.ascent_bound == "cap":
            return 1.0 if value <= cap else 0.0
        if self.ascent_bound == "tanh":
            return 1.0 - math.tanh(value / cap) ** 2 if cap > 0 else 0.0
        return 1.0

    def trajectory_points(self, steps: int) -> list[int]:
        """Inner steps k (1-based) whose iterate θ_k carries ascent terms: the end only, or along the trajectory."""
        if self.ascent_along == "end" or steps == 0:
            return [steps] if steps else []
        return sorted({*range(self.trajectory_stride, steps + 1, self.trajectory_stride), steps})

    @property
    def second_order(self) -> bool:
        return self.order != "first"

    @property
    def anchors_to_start(self) -> bool:
        """Whether the forget term's target is the prediction of the start weights θ0."""
        return self.forget_term == "anchor" and self.anchor_to == "start" and self.beta_forget > 0

    @property
    def caps_from_start(self) -> bool:
        """Whether some ascent term's relative cap is a multiple of the start weights' loss L(θ0) on its draw."""
        if not (self.relative_cap and self.ascent_cap_reference == "start"):
            return False
        forget_ascends = self.forget_term == "ascent" and self.beta_forget > 0
        return forget_ascends or self.beta_related > 0 or self.beta_irrelevant > 0

    @property
    def needs_start_weights(self) -> bool:
        """Whether the objective keeps a copy θ0 of the trained parameters as the meta stage began (the forget
        anchor's target, or the reference of relative caps)."""
        return self.anchors_to_start or self.caps_from_start

    @property
    def needs_attack(self) -> bool:
        return self.beta_forget > 0 or self.beta_related > 0 or self.beta_irrelevant > 0
