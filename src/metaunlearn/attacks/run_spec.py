"""One finetuning attack run (:class:`AttackSpec`): how the attacker trains and at which steps it is evaluated.

A run finetunes a released model on a data set for ``max(snapshot_steps)`` optimizer steps and evaluates it at
every snapshot step. A suite (:mod:`.suite_config`) expands into one spec per attack set × kind × lr × seed.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from metaunlearn.attacks.kind_settings import (
    AttackMode,
    DreamBoothSettings,
    LoraSettings,
    OptimizerName,
    QuantizeSettings,
    ScheduleName,
    StageSettings,
    TextualInversionSettings,
    TrainableSubset,
    check_snapshot_samples,
    sorted_snapshot_steps,
)
from metaunlearn.config import StrictModel


class AttackSpec(StrictModel):
    """One finetuning attack: how to train and when to evaluate."""

    mode: AttackMode = "full"
    name: str | None = Field(None, description="kind name in run names and results (default: the mode)")
    subset: TrainableSubset = Field("full", description="UNet weights a full finetune trains (ignored by LoRA)")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    dreambooth: DreamBoothSettings | None = Field(None, description="DreamBooth captions + prior preservation")
    textual_inversion: TextualInversionSettings = Field(default_factory=TextualInversionSettings)
    before: list[StageSettings] = Field(default_factory=list, description="sequential: stages on other sets first")
    quantize: QuantizeSettings | None = Field(
        None, description="the released UNet loaded at reduced precision first (step 0: the quantized model)")
    optimizer: OptimizerName = "adamw"
    schedule: ScheduleName = "constant"
    warmup_steps: int = Field(0, ge=0)
    lr: float = Field(1e-5, gt=0)
    lr_multiple: float | None = Field(None, description="lr as a multiple of the suite's reference lr (reported)")
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (ignored by AdamW)")
    batch_size: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null disables clipping")
    seed: int = 0
    snapshot_steps: list[int] = Field(default_factory=lambda: [0, 50, 100, 200, 300], min_length=1)
    probe_size: int = Field(8, ge=1, description="training examples in the fixed-noise loss probe at each snapshot")
    snapshot_samples: dict[int, int] = Field(
        default_factory=dict,
        description="evaluation budget: samples per prompt at these snapshot steps; the others get the evaluation's")

    _sorted_unique_steps = field_validator("snapshot_steps")(classmethod(lambda cls, v: sorted_snapshot_steps(v)))

    @model_validator(mode="after")
    def _stages_fit(self) -> AttackSpec:
        if self.before and sum(s.steps for s in self.before) >= self.steps:
            raise ValueError("the 'before' stages take every step: the last snapshot must come after them")
        if self.before and self.mode == "textual_inversion":
            raise ValueError("a textual inversion attack has no 'before' stages (its token is only in its own captions)")
        if self.schedule == "constant" and self.warmup_steps:
            raise ValueError("schedule 'constant' has no warm-up: use 'constant_with_warmup'")
        check_snapshot_samples(self.snapshot_samples, self.snapshot_steps)
        return self

    @property
    def steps(self) -> int:
        """Total optimizer steps: the last snapshot (a sequential attack's earlier stages included)."""
        return max(self.snapshot_steps)

    @property
    def kind(self) -> str:
        """The attack's name in results: its kind name, or its mode."""
        return self.name or self.mode

    @property
    def run_name(self) -> str:
        """File stem of this run in a run dir: ``<kind>_lr<lr>_s<seed>``."""
        return f"{self.kind}_lr{self.lr:g}_s{self.seed}"

    @property
    def eval_prompts(self) -> list[str] | None:
        """Prompts replacing the forget prompt sets' when this attack is evaluated (its trigger), or None."""
        if self.mode == "textual_inversion":
            return [self.textual_inversion.caption]
        if self.dreambooth is not None:
            return [self.dreambooth.instance_prompt]
        return None
