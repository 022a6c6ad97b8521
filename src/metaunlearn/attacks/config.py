"""Configuration of relearning attacks, by responsibility:

* :mod:`metaunlearn.attacks.kind_settings` — option names (modes, optimizers, schedules, UNet subsets) and the
  settings of an attack's parts: LoRA, DreamBooth, textual inversion, the stages of a sequential attack;
* :mod:`metaunlearn.attacks.run_spec` — one finetuning attack run (:class:`AttackSpec`);
* :mod:`metaunlearn.attacks.prompt_spec` — one prompt attack (:class:`PromptAttackSpec`);
* :mod:`metaunlearn.attacks.suite_config` — a sweep (:class:`AttackSuiteConfig`, YAML section ``attack``) and its
  expansion into runs.

This module gathers their public names, so ``from metaunlearn.attacks.config import ...`` keeps working.
"""

from __future__ import annotations

from metaunlearn.attacks.kind_settings import (
    BUILTIN_MODES,
    DEFAULT_LORA_TARGETS,
    AttackMode,
    DreamBoothSettings,
    LoraSettings,
    OptimizerName,
    ScheduleName,
    StageSettings,
    TextualInversionSettings,
    TrainableSubset,
    sorted_snapshot_steps,
)
from metaunlearn.attacks.prompt_spec import PromptAttackKind, PromptAttackSpec
from metaunlearn.attacks.run_spec import AttackSpec
from metaunlearn.attacks.suite_config import AttackKind, AttackSetData, AttackSuiteConfig

__all__ = [
    "BUILTIN_MODES", "DEFAULT_LORA_TARGETS", "AttackKind", "AttackMode", "AttackSetData", "AttackSpec",
    "AttackSuiteConfig", "DreamBoothSettings", "LoraSettings", "OptimizerName", "PromptAttackKind",
    "PromptAttackSpec", "ScheduleName", "StageSettings", "TextualInversionSettings", "TrainableSubset",
    "sorted_snapshot_steps",
]
