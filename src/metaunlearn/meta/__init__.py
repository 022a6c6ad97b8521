"""The meta-unlearning objective (method-agnostic) and the simulated attacks it differentiates through."""

from metaunlearn.meta.config import AttackConfig, MetaConfig
from metaunlearn.meta.objective import MetaObjective, PlainObjective, autocast_factory
from metaunlearn.meta.plan import Draw, MetaData, StepPlan, make_plan

__all__ = [
    "AttackConfig",
    "Draw",
    "MetaConfig",
    "MetaData",
    "MetaObjective",
    "PlainObjective",
    "StepPlan",
    "autocast_factory",
    "make_plan",
]
