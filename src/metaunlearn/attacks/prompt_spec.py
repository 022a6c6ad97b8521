"""One prompt attack (:class:`PromptAttackSpec`): the weights stay as released, only the prompting changes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from metaunlearn.config import StrictModel

PromptAttackKind = Literal["soft_prompt", "concept_vector", "hard_prompt"]


class PromptAttackSpec(StrictModel):
    """One prompt attack: the weights stay as released, only what the model is prompted with changes.

    * ``soft_prompt`` (UnlearnDiffAtk-style, Zhang 2024): ``tokens`` new tokens prepended to every forget prompt;
      their embedding vectors (one per text encoder) are optimised with Adam for ``steps`` steps so the model
      denoises the concept's images (the suite's ``prompt_attack_set``) under the prefixed prompts;
    * ``concept_vector`` (Ring-A-Bell-style, Tsai 2024): ``v`` = mean over pairs of E(prompt with the concept) −
      E(same prompt without it) in text-encoder output space; the forget prompts are sampled from E(p) + strength·v;
    * ``hard_prompt`` (a discrete search judged by the detector): ``tokens`` vocabulary words prepended to the forget
      prompts, improved word by word over ``rounds`` rounds of ``candidates`` random words per position, each
      candidate scored by the detector's concept rate on ``judge_samples`` samples (seeds apart from evaluation's).
    """

    kind: PromptAttackKind
    tokens: int = Field(3, ge=1, description="soft / hard: prefix length in tokens")
    init_words: str = Field("a", min_length=1, description="soft: words whose mean embedding starts each vector")
    steps: int = Field(50, ge=1, description="soft: optimisation steps")
    lr: float = Field(1e-2, gt=0, description="soft: Adam learning rate")
    batch_size: int = Field(8, ge=1, description="soft: concept images per step")
    concept_prompts: list[str] = Field(default_factory=list, description="concept_vector: prompts with the concept")
    neutral_prompts: list[str] = Field(default_factory=list, description="concept_vector: the same without it")
    strength: float = Field(1.0, description="concept_vector: η, the multiple of v added")
    rounds: int = Field(2, ge=1, description="hard: passes over the prefix positions")
    candidates: int = Field(8, ge=1, description="hard: random words tried per position and round")
    judge_samples: int = Field(8, ge=1, description="hard: samples scoring one candidate")
    vocabulary: list[str] | None = Field(None, description="hard: candidate words (default: the tokenizer's words)")

    @model_validator(mode="after")
    def _pairs(self) -> PromptAttackSpec:
        if self.kind == "concept_vector":
            if not self.concept_prompts or len(self.concept_prompts) != len(self.neutral_prompts):
                raise ValueError("concept_vector needs concept_prompts and as many neutral_prompts (pairs)")
        return self
