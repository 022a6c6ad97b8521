"""Configuration of relearning attacks: one attack run (:class:`AttackSpec`) and a sweep of them (:class:`AttackSuiteConfig`).

An attack finetunes a released model on a data set for ``max(snapshot_steps)`` optimizer steps and evaluates it at
every snapshot step. A suite names its attack sets (the paper's HRM-s, HRM-m and CLEAN: one data folder each) and
sweeps learning rates × seeds × modes over every set, so the report can give mean ± std over seeds *and* the worst
case over the whole sweep (durability claims that hold for one hyperparameter setting often fail for another).

YAML section ``attack`` of an experiment config::

    attack:
      sets:
        hrm-s: {data: data/hrm_s}          # imagefolder (cached on first use) or a cached .safetensors set
        hrm-m: {data: data/hrm_m}
        clean: {data: data/clean}
      modes: [full, lora]
      lrs: [1.0e-5]
      seeds: [0, 1, 2]
      snapshot_steps: [0, 50, 100, 200, 300]
      batch_size: 4
      optimizer: adamw
      subset: full                          # full finetuning: which UNet weights train
      lora: {rank: 4, alpha: 4}
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Literal

from pydantic import Field, field_validator, model_validator

from metaunlearn.config import StrictModel

AttackMode = Literal["full", "lora"]
OptimizerName = Literal["adamw", "sgd"]
TrainableSubset = Literal["full", "xattn", "noxattn", "selfattn"]

DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
"""The UNet attention projections (self- and cross-attention) LoRA adapts, as diffusers' LoRA training scripts do."""


def sorted_snapshot_steps(steps: list[int]) -> list[int]:
    """Snapshot steps sorted and de-duplicated; negative steps are an error."""
    if any(s < 0 for s in steps):
        raise ValueError("snapshot steps must be >= 0")
    return sorted(set(steps))


class LoraSettings(StrictModel):
    """A peft ``LoraConfig`` on the UNet attention projections."""

    rank: int = Field(4, ge=1, description="LoRA rank r")
    alpha: float = Field(4.0, gt=0, description="LoRA scaling numerator (scale = alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), min_length=1)


class AttackSpec(StrictModel):
    """One finetuning attack: how to train and when to evaluate."""

    mode: AttackMode = "full"
    subset: TrainableSubset = Field("full", description="UNet weights a full finetune trains (ignored by LoRA)")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optimizer: OptimizerName = "adamw"
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (ignored by AdamW)")
    batch_size: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null disables clipping")
    seed: int = 0
    snapshot_steps: list[int] = Field(default_factory=lambda: [0, 50, 100, 200, 300], min_length=1)
    probe_size: int = Field(8, ge=1, description="training examples in the fixed-noise loss probe at each snapshot")

    _sorted_unique_steps = field_validator("snapshot_steps")(classmethod(lambda cls, v: sorted_snapshot_steps(v)))

    @property
    def steps(self) -> int:
        """Total optimizer steps: the last snapshot."""
        return max(self.snapshot_steps)

    @property
    def run_name(self) -> str:
        """File stem of this run in a run dir: ``<mode>_lr<lr>_s<seed>``."""
        return f"{self.mode}_lr{self.lr:g}_s{self.seed}"


class AttackSetData(StrictModel):
    """Where one attack set's training data lives."""

    data: str | None = Field(
        None, description="imagefolder with metadata.jsonl, or a cached set (.safetensors); "
        "experiments may instead generate it (attack_data)"
    )
    description: str = ""
    modes: list[AttackMode] | None = Field(None, description="this set only: overrides the suite's modes")
    lrs: list[float] | None = Field(None, description="this set only: overrides the suite's learning rates")
    lora_lrs: list[float] | None = Field(None, description="this set only: overrides the suite's LoRA learning rates")
    seeds: list[int] | None = Field(None, description="this set only: overrides the suite's seeds")
    snapshot_steps: list[int] | None = Field(None, description="this set only: overrides the suite's snapshot steps")

    _sorted_unique_steps = field_validator("snapshot_steps")(
        classmethod(lambda cls, v: v if v is None else sorted_snapshot_steps(v))
    )


class AttackSuiteConfig(StrictModel):
    """Section ``attack``: attack sets × modes × learning rates × seeds, each evaluated at the snapshot steps."""

    sets: dict[str, AttackSetData] = Field(min_length=1)
    modes: list[AttackMode] = Field(default_factory=lambda: ["full"], min_length=1)
    lrs: list[float] = Field(default_factory=lambda: [1e-5], min_length=1)
    lora_lrs: list[float] | None = Field(
        None, description="learning rates of LoRA runs (LoRA usually needs a higher lr than full finetuning; "
                          "default: lrs)"
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    snapshot_steps: list[int] = Field(default_factory=lambda: [0, 50, 100, 200, 300], min_length=1)
    batch_size: int = Field(1, ge=1)
    optimizer: OptimizerName = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    subset: TrainableSubset = "full"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    probe_size: int = Field(8, ge=1)
    cache_dir: str | None = Field(None, description="where imagefolders are cached as latents (default: RUN_DIR/cache)")
    grid_images: int = Field(8, ge=0, description="samples per snapshot saved as a grid PNG (0: none)")

    @field_validator("lrs", "lora_lrs")
    @classmethod
    def _positive_lrs(cls, lrs: list[float] | None) -> list[float] | None:
        if lrs is not None and any(lr <= 0 for lr in lrs):
            raise ValueError("learning rates must be > 0")
        return lrs

    _sorted_unique_steps = field_validator("snapshot_steps")(classmethod(lambda cls, v: sorted_snapshot_steps(v)))

    @model_validator(mode="after")
    def _unique_lists(self) -> AttackSuiteConfig:
        for name in ("modes", "lrs", "lora_lrs", "seeds"):
            values = getattr(self, name) or []
            if len(set(values)) != len(values):
                raise ValueError(f"'{name}' lists a value twice")
        return self

    def specs(self, set_name: str | None = None) -> Iterator[AttackSpec]:
        """Every (mode, lr, seed) combination as an :class:`AttackSpec` (attack sets are crossed by the caller).

        With ``set_name``, that set's own ``modes``/``lrs``/``lora_lrs``/``seeds``/``snapshot_steps`` replace the
        suite's where it gives them. LoRA runs use ``lora_lrs`` when given, else ``lrs``.
        """
        own = self.sets.get(set_name) if set_name is not None else None

        def pick(name: str):
            value = getattr(own, name) if own is not None else None
            return value if value else getattr(self, name)

        modes, seeds, steps = pick("modes"), pick("seeds"), pick("snapshot_steps")
        lrs = {"full": pick("lrs"), "lora": pick("lora_lrs") or pick("lrs")}
        for mode in modes:
            for lr, seed in itertools.product(lrs[mode], seeds):
                yield AttackSpec(
                    mode=mode,
                    subset=self.subset,
                    lora=self.lora,
                    optimizer=self.optimizer,
                    lr=lr,
                    weight_decay=self.weight_decay,
                    momentum=self.momentum,
                    batch_size=self.batch_size,
                    grad_clip=self.grad_clip,
                    seed=seed,
                    snapshot_steps=steps,
                    probe_size=self.probe_size,
                )
