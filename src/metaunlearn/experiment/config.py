"""The experiment config of ``metaunlearn run CONFIG``: every section of one YAML file, validated together.

Sections (each owned by its stage; see the stage modules for their keys)::

    model:       the base model folder (diffusers, safetensors)
    run_dir:     where everything goes (default: runs/<config file stem>)
    data:        concept data for the meta objective        (metaunlearn.data.config.DataConfig)
    attack_data: attack sets generated from the base model  (name -> prompts, images per prompt)
    unlearn:     the unlearning stage template              (metaunlearn.unlearn.UnlearnConfig)
    grid:        methods x {plain, meta} the experiment compares
    attack:      relearning attacks on every model          (metaunlearn.attacks.suite_config.AttackSuiteConfig)
    eval:        what every model and snapshot is measured on (metaunlearn.metrics.config.EvalConfig)
    references:  models attacked with the identical sweep as a yardstick (metaunlearn.attacks.reference)
    report:      tables and figures                         (metaunlearn.experiment.report.ReportConfig)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from metaunlearn.attacks.reference import ReferenceModel
from metaunlearn.attacks.suite_config import AttackSuiteConfig
from metaunlearn.config import StrictModel
from metaunlearn.data.config import DataConfig, SamplerSettings
from metaunlearn.experiment.report import ReportConfig
from metaunlearn.metrics.config import EvalConfig

Variant = Literal["plain", "meta"]


class ControlSpec(StrictModel):
    """The equal-damage control: the plain method pushed harder until its benign accuracy matches the meta model's."""

    steps: int | None = Field(None, ge=1, description="outer steps (default: the plain variant's)")
    lr: float | None = Field(None, gt=0, description="learning rate (default: the plain variant's)")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters replaced (e.g. erase_scale)")


class GridMethod(StrictModel):
    """One base method of the comparison; ``steps``/``lr`` override the unlearn template for it."""

    name: str = Field(min_length=1, description="registered method: esd, sdd, uce, rece")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's own parameters")
    steps: int | None = Field(None, ge=1, description="outer steps of plain unlearning (ESD/SDD)")
    meta_steps: int | None = Field(None, ge=1, description="outer steps with the meta objective (default: steps)")
    lr: float | None = Field(None, gt=0)
    meta_params: dict[str, Any] = Field(
        default_factory=dict, description="method parameters replaced in the meta variant only (e.g. its trained subset)"
    )
    meta_lr: float | None = Field(None, gt=0, description="outer learning rate of the meta variant (default: lr)")
    meta: dict[str, Any] = Field(
        default_factory=dict, description="meta-objective keys replaced for this method (e.g. its simulated attacks)"
    )
    label: str | None = Field(None, description="model name prefix in results (default: the method name)")
    control: ControlSpec | None = Field(None, description="also build and attack the equal-damage control "
                                                          "<label>-control (plain unlearning, pushed harder)")
    meta_from_plain: bool = Field(
        False,
        description="the meta variant starts from this method's plain model (needs the plain variant in the grid)",
    )

    @property
    def model_label(self) -> str:
        return self.label or self.name


class GridConfig(StrictModel):
    """Which models the experiment builds and attacks: every method in every variant (+ the base model)."""

    methods: list[GridMethod] = Field(min_length=1)
    variants: list[Variant] = Field(default_factory=lambda: ["plain", "meta"], min_length=1)
    include_base: bool = Field(True, description="also attack the base (never unlearned) model, as a reference")
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1,
        description="replicates: every model rebuilt per seed s and attacked with the suite's seeds + s",
    )

    @model_validator(mode="after")
    def _unique(self) -> GridConfig:
        labels = [m.model_label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError("two grid methods share a label; give one a 'label'")
        if any(m.meta_from_plain for m in self.methods) and not {"plain", "meta"} <= set(self.variants):
            raise ValueError("meta_from_plain needs both the plain and the meta variant in grid.variants")
        if len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError("grid seeds must be distinct and >= 0")
        return self


class AttackDataSpec(StrictModel):
    """An attack set the runner makes: sampled from the base model, or (toy world) the attacker's own images."""

    prompts: list[str] = Field(min_length=1)
    images_per_prompt: int = Field(8, ge=1)
    seed: int = 0
    sampler: SamplerSettings | None = None
    source: Literal["model", "render"] = Field(
        "model",
        description="model: samples of the base model; render: the toy world's procedural renders of each prompt",
    )

    @model_validator(mode="after")
    def _renderable(self) -> AttackDataSpec:
        if self.source == "render":
            from metaunlearn.toyworld.world import concept_of_prompt

            for prompt in self.prompts:
                try:
                    concept_of_prompt(prompt)
                except ValueError:
                    raise ValueError(f"source 'render' draws concept-world prompts only; {prompt!r} is not one") from None
        return self


class ExperimentConfig(StrictModel):
    """A whole experiment: data -> unlearning grid -> attacks -> evaluation -> report."""

    model: Path
    run_dir: Path | None = None
    data: DataConfig | None = None
    attack_data: dict[str, AttackDataSpec] = Field(
        default_factory=dict, description="attack sets generated into RUN_DIR/attack_data/<name>"
    )
    unlearn: dict[str, Any] | None = Field(None, description="the unlearn stage template (validated per grid model)")
    grid: GridConfig | None = None
    attack: AttackSuiteConfig | None = None
    eval: EvalConfig | None = None
    references: list[ReferenceModel] = Field(
        default_factory=list, description="models that never saw the concept, attacked like every grid model")
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _stages_fit(self) -> ExperimentConfig:
        names = [r.name for r in self.references]
        taken = {"base"} | {f"{m.model_label}-{v}" for m in (self.grid.methods if self.grid else [])
                            for v in [*self.grid.variants, "control"]}
        if len(set(names)) != len(names) or taken & set(names):
            raise ValueError("every reference needs its own name, unlike 'base' and every grid model")
        if self.references and self.attack is None:
            raise ValueError("'references' are attacked: they need an 'attack' section")
        if self.grid is not None and self.unlearn is None:
            raise ValueError("'grid' needs an 'unlearn' section (the template every grid model starts from)")
        if self.attack is not None:
            for name, spec in self.attack.sets.items():
                if not spec.data and name not in self.attack_data:
                    raise ValueError(f"attack set '{name}' has no data and no attack_data entry")
            shared = [len(self.attack.seeds)] + [len(s.seeds) for s in self.attack.sets.values() if s.seeds]
            if self.grid is not None and len(self.grid.seeds) > 1 and max(shared) > 1:
                raise ValueError("give several seeds in grid.seeds or in the attack section, not both")
        return self
