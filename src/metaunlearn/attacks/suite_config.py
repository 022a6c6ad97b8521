"""A sweep of relearning attacks (:class:`AttackSuiteConfig`, YAML section ``attack``) and its expansion into runs.

A suite names its attack sets (the paper's HRM-s, HRM-m and CLEAN: one data folder each) and sweeps learning
rates × seeds × modes over every set, so the report can give mean ± std over seeds *and* the worst case over the
whole sweep (durability claims that hold for one hyperparameter setting often fail for another).

A *mode* is ``full``, ``lora`` or the name of an entry of ``kinds``: one named attack with its own training
settings (:class:`AttackKind`) — a UNet subset, LoRA rank and targets, DreamBooth with prior preservation,
textual inversion, a sequential attack (stages on other sets first), weights loaded at reduced precision, an optimizer and learning-rate schedule, and
learning rates given outright or as multiples of the suite's ``reference_lr``.

YAML section ``attack`` of an experiment config::

    attack:
      sets:
        hrm-s: {data: data/hrm_s}          # imagefolder (cached on first use) or a cached .safetensors set
        hrm-m: {data: data/hrm_m}
        clean: {data: data/clean}
      modes: [full, lora, xattn-sgd, dreambooth, ti, benign-first]
      lrs: [1.0e-5]
      reference_lr: 1.0e-5                  # lr_multiples of a kind are multiples of this
      seeds: [0, 1, 2]
      snapshot_steps: [0, 50, 100, 200, 300]
      snapshot_samples: {50: 2, 200: 2}     # evaluation budget: 2 samples per prompt there, the eval's elsewhere
      batch_size: 4
      optimizer: adamw                      # adamw | adam | sgd (momentum: ...)
      schedule: constant                    # any diffusers.optimization scheduler name; warmup_steps: N
      subset: full                          # full finetuning: which UNet weights train
      lora: {rank: 4, alpha: 4}
      kinds:
        xattn-sgd: {mode: full, subset: xattn, optimizer: sgd, momentum: 0.9, lr_multiples: [10, 100]}
        lora16: {mode: lora, lora: {rank: 16, alpha: 16, target_modules: [to_k, to_v]}, lr_multiples: [3]}
        dreambooth: {mode: full, dreambooth: {instance_prompt: "a sks triangle", class_prompt: "a triangle"}}
        ti: {mode: textual_inversion, textual_inversion: {init_words: "triangle"}, lrs: [5.0e-3]}
        benign-first: {mode: full, before: [{set: clean, steps: 50}]}   # 50 steps on clean, then this set
        int4: {mode: full, quantize: {bits: 4, block_size: 64}, lrs: [1.0e-5]}  # step 0: the model loaded in 4 bits
        qlora: {mode: lora, quantize: {bits: 4, block_size: 64}, lr_multiples: [10]}  # adapters on a 4-bit base
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from pydantic import Field, field_validator, model_validator

from metaunlearn.attacks.kind_settings import (
    BUILTIN_MODES,
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
    positive_lrs,
    sorted_snapshot_steps,
)
from metaunlearn.attacks.prompt_spec import PromptAttackSpec
from metaunlearn.attacks.run_spec import AttackSpec
from metaunlearn.config import StrictModel


class AttackSetData(StrictModel):
    """Where one attack set's training data lives."""

    data: str | None = Field(
        None, description="image folder with metadata.jsonl or a cached .safetensors set (or generated: attack_data)"
    )
    description: str = ""
    modes: list[str] | None = Field(None, description="this set only: overrides the suite's modes")
    lrs: list[float] | None = Field(None, description="this set only: overrides the suite's learning rates")
    lora_lrs: list[float] | None = Field(None, description="this set only: overrides the suite's LoRA learning rates")
    seeds: list[int] | None = Field(None, description="this set only: overrides the suite's seeds")
    snapshot_steps: list[int] | None = Field(None, description="this set only: overrides the suite's snapshot steps")

    _sorted_unique_steps = field_validator("snapshot_steps")(
        classmethod(lambda cls, v: v if v is None else sorted_snapshot_steps(v))
    )
    _positive_lrs = field_validator("lrs", "lora_lrs")(classmethod(lambda cls, v: positive_lrs(v)))


class AttackKind(StrictModel):
    """A named attack of a suite: its mode and training settings; unset fields take the suite's."""

    mode: AttackMode = "full"
    subset: TrainableSubset | None = None
    lora: LoraSettings | None = None
    dreambooth: DreamBoothSettings | None = None
    textual_inversion: TextualInversionSettings | None = None
    before: list[StageSettings] = Field(default_factory=list)
    quantize: QuantizeSettings | None = Field(None, description="round the UNet's weights first (8-bit, QLoRA-style 4-bit)")
    optimizer: OptimizerName | None = None
    schedule: ScheduleName | None = None
    warmup_steps: int | None = Field(None, ge=0)
    weight_decay: float | None = Field(None, ge=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    batch_size: int | None = Field(None, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    lrs: list[float] | None = Field(None, description="learning rates of this kind (default: the suite's)")
    lr_multiples: list[float] | None = Field(None, description="learning rates as multiples of reference_lr")

    @model_validator(mode="after")
    def _one_lr_source(self) -> AttackKind:
        if self.lrs and self.lr_multiples:
            raise ValueError("give either 'lrs' or 'lr_multiples', not both")
        for values in (self.lrs or [], self.lr_multiples or []):
            if any(v <= 0 for v in values) or len(set(values)) != len(values):
                raise ValueError("learning rates / multiples must be > 0 and distinct")
        if self.dreambooth is not None and self.mode == "textual_inversion":
            raise ValueError("DreamBooth trains the UNet (mode full or lora), not textual inversion")
        return self


class AttackSuiteConfig(StrictModel):
    """Section ``attack``: attack sets × modes × learning rates × seeds, each evaluated at the snapshot steps."""

    sets: dict[str, AttackSetData] = Field(min_length=1)
    modes: list[str] = Field(default_factory=lambda: ["full"], min_length=1,
                             description="full, lora, or names under 'kinds'")
    lrs: list[float] = Field(default_factory=lambda: [1e-5], min_length=1)
    lora_lrs: list[float] | None = Field(
        None, description="learning rates of LoRA runs (LoRA usually needs a higher lr than full finetuning; "
                          "default: lrs)"
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    snapshot_steps: list[int] = Field(default_factory=lambda: [0, 50, 100, 200, 300], min_length=1)
    batch_size: int = Field(1, ge=1)
    optimizer: OptimizerName = "adamw"
    schedule: ScheduleName = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    subset: TrainableSubset = "full"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    kinds: dict[str, AttackKind] = Field(default_factory=dict, description="named attacks 'modes' may list")
    reference_lr: float | None = Field(None, gt=0, description="the lr that kinds' lr_multiples multiply")
    prompt_attacks: dict[str, PromptAttackSpec] = Field(
        default_factory=dict, description="named prompt attacks (no weight change), each run once per seed"
    )
    prompt_attack_set: str | None = Field(
        None, description="attack set whose images are the concept's (soft prompts; default: the first set)"
    )
    probe_size: int = Field(8, ge=1)
    snapshot_samples: dict[int, int] = Field(
        default_factory=dict,
        description="samples per prompt at these snapshot steps, e.g. {50: 2}; others get eval.samples_per_prompt")
    cache_dir: str | None = Field(None, description="where imagefolders are cached as latents (default: RUN_DIR/cache)")
    grid_images: int = Field(8, ge=0, description="samples per snapshot saved as a grid PNG (0: none)")

    _positive_lrs = field_validator("lrs", "lora_lrs")(classmethod(lambda cls, v: positive_lrs(v)))

    _sorted_unique_steps = field_validator("snapshot_steps")(classmethod(lambda cls, v: sorted_snapshot_steps(v)))

    @model_validator(mode="after")
    def _unique_lists(self) -> AttackSuiteConfig:
        for name in ("modes", "lrs", "lora_lrs", "seeds"):
            values = getattr(self, name) or []
            if len(set(values)) != len(values):
                raise ValueError(f"'{name}' lists a value twice")
        for own in [self, *self.sets.values()]:
            for mode in own.modes or []:
                if mode not in BUILTIN_MODES and mode not in self.kinds:
                    raise ValueError(f"mode {mode!r} is neither full, lora nor a name under 'kinds'")
        check_snapshot_samples(self.snapshot_samples)
        if self.prompt_attack_set is not None and self.prompt_attack_set not in self.sets:
            raise ValueError(f"prompt_attack_set {self.prompt_attack_set!r} is not under 'sets'")
        for name, kind in self.kinds.items():
            if kind.lr_multiples and self.reference_lr is None:
                raise ValueError(f"kind {name!r} gives lr_multiples but the suite has no reference_lr")
            for stage in kind.before:
                if stage.set not in self.sets:
                    raise ValueError(f"kind {name!r}: stage set {stage.set!r} is not under 'sets'")
        self._check_runs()
        return self

    def _check_runs(self) -> None:
        """Every run the suite expands into is a valid :class:`AttackSpec` (a kind's 'before' stages within each
        set's last snapshot, its warm-up under the schedule), checked here so a bad run is refused at load time."""
        from pydantic import ValidationError

        for set_name in self.sets:
            try:
                for _ in self.specs(set_name):
                    pass
            except ValidationError as exc:
                err = exc.errors()[0]
                run = err["input"] if isinstance(err["input"], dict) else {}
                kind = run.get("name") or run.get("mode")
                msg = err["msg"].removeprefix("Value error, ")
                raise ValueError(f"attack set {set_name!r}, kind {kind!r}: {msg}") from None

    def stage_sets(self) -> set[str]:
        """Attack sets that sequential kinds train on before their own set, and the prompt attacks' image set."""
        needed = {stage.set for kind in self.kinds.values() for stage in kind.before}
        if any(p.kind == "soft_prompt" for p in self.prompt_attacks.values()):
            needed.add(self.concept_set)
        return needed

    @property
    def concept_set(self) -> str:
        """The attack set whose images soft prompt attacks fit (``prompt_attack_set``, default the first set)."""
        return self.prompt_attack_set or next(iter(self.sets))

    def _kind_spec(self, name: str, lr: float, multiple: float | None, seed: int, steps: list[int]) -> AttackSpec:
        kind = self.kinds.get(name) or AttackKind(mode=name)

        def own(field: str):
            value = getattr(kind, field)
            return getattr(self, field) if value is None else value

        return AttackSpec(
            mode=kind.mode,
            name=name if name in self.kinds else None,
            subset=own("subset"),
            lora=own("lora"),
            dreambooth=kind.dreambooth,
            textual_inversion=kind.textual_inversion or TextualInversionSettings(),
            before=kind.before,
            quantize=kind.quantize,
            optimizer=own("optimizer"),
            schedule=own("schedule"),
            warmup_steps=own("warmup_steps"),
            lr=lr,
            lr_multiple=multiple,
            weight_decay=own("weight_decay"),
            momentum=own("momentum"),
            batch_size=own("batch_size"),
            grad_clip=own("grad_clip"),
            seed=seed,
            snapshot_steps=steps,
            probe_size=self.probe_size,
            snapshot_samples={s: k for s, k in self.snapshot_samples.items() if s in steps},
        )

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
        for mode in modes:
            for (lr, multiple), seed in itertools.product(self._lrs(mode, pick), seeds):
                yield self._kind_spec(mode, lr, multiple, seed, steps)

    def _lrs(self, mode: str, pick) -> list[tuple[float, float | None]]:
        """``(lr, multiple of reference_lr or None)`` of a mode: the kind's own, else LoRA's, else the set's."""
        kind = self.kinds.get(mode)
        if kind is not None and kind.lr_multiples:
            return [(m * self.reference_lr, m) for m in kind.lr_multiples]
        if kind is not None and kind.lrs:
            lrs = kind.lrs
        elif (kind.mode if kind is not None else mode) == "lora":
            lrs = pick("lora_lrs") or pick("lrs")
        else:
            lrs = pick("lrs")
        ref = self.reference_lr
        return [(lr, lr / ref if ref else None) for lr in lrs]
