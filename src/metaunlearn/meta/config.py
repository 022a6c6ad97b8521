"""Configuration of the meta objective and of the simulated attack(s) it differentiates through.

Library defaults: retain γ = 1 on both benign sets, ascent β_f = 0.1, β_rel = 0.1, β_ir = 0.01, first order — the
ratios the official scripts probably meant, with retain weights strong enough to hold benign concepts in place (a
proxy run of the official weights, γ_ir 0.1 / γ_rel 0.01, collapsed the model before any attack).
On the toy world these first-order settings did not slow relearning; the demo uses exact second order with γ = 2,
β = 1/1/0.1 and 5 inner AdamW steps (README, "How the meta settings were chosen"). Second order is computed in
reverse mode (:mod:`metaunlearn.meta.reverse`): memory of about 1.5 first-order steps plus host-side snapshots.

The official simulated attack is one epoch of AdamW (lr 1e-5, clip 1.0, weight decay 1e-4, fresh state every
outer step) over forget-train at batch 10 on the full UNet: ``AttackConfig()``'s defaults.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from metaunlearn.backbones.base import TRAINABLE_SUBSETS
from metaunlearn.config import StrictModel

ATTACK_SUBSETS = (*TRAINABLE_SUBSETS, "lora")


class AttackConfig(StrictModel):
    """One simulated relearning attack A(θ): finetuning on forget-train, run in place each outer step."""

    weight: float = Field(1.0, gt=0, description="sampling weight when several attacks form a distribution")
    steps: int | None = Field(None, ge=1, description="inner optimizer steps (overrides epochs)")
    epochs: int = Field(1, ge=1, description="passes over forget-train when steps is not set")
    batch_size: int = Field(10, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-5, gt=0)
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


class MetaConfig(StrictModel):
    """The meta objective (see :mod:`metaunlearn.meta.objective`)."""

    base_weight: float = Field(
        1.0, ge=0, description="weight α of the base method's loss; 0 leaves it out (retain + meta terms only, "
                               "e.g. after a closed-form edit or continuing from an already-erased plain model)"
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
        description="UNet subset the meta terms train (default: the method's); the base loss still trains only "
                    "the method's subset, so e.g. ESD-x keeps its cross-attention edit while the meta terms shape "
                    "the whole UNet an attacker would finetune",
    )
    order: Literal["first", "second", "second_fd", "second_unrolled"] = Field(
        "first",
        description="first: gradients at θ' applied to θ (dθ'/dθ ≈ I); second: exact, reverse mode through the inner "
                    "steps (one double backward per step, parameter snapshots); second_fd: the same with "
                    "finite-difference Hessian-vector products (approximate, error O(fd_eps²)); second_unrolled: exact "
                    "by unrolling every inner step into one autograd graph (reference; memory grows with the steps)",
    )
    fd_eps: float = Field(
        1e-3, gt=0, description="second_fd: relative step of the central difference, h = fd_eps·‖x‖/‖w‖"
    )
    offload: bool = Field(
        True, description="keep the saved θ (and, second order, the inner-step gradients) in host memory (pinned "
                          "when the UNet is on a GPU); no effect on CPU"
    )
    attacks: list[AttackConfig] = Field(default_factory=lambda: [AttackConfig()], min_length=1)

    @model_validator(mode="after")
    def _second_order_support(self) -> MetaConfig:
        if self.order == "second_unrolled" and any(a.trainable == "lora" for a in self.attacks):
            raise ValueError("order 'second_unrolled' supports UNet-subset attacks only, not lora")
        return self

    @property
    def second_order(self) -> bool:
        return self.order != "first"

    @property
    def needs_attack(self) -> bool:
        return self.beta_forget > 0 or self.beta_related > 0 or self.beta_irrelevant > 0
