"""What every unlearning method is: a typed config plus either a per-step loss or a closed-form weight edit.

A method never owns the training loop. It receives an :class:`UnlearnInputs` (backbone, forget prompts, preserve
prompts, the run's generator) and

* a **loss method** (ESD, SDD) returns a :class:`BaseLoss` — ``loss(step, generator) -> (scalar, terms)``, called
  once per outer step; the stage (optionally wrapped by the meta objective) does the backward pass and the
  optimizer step, then calls ``loss.after_step()``;
* an **edit method** (UCE, RECE) changes the UNet's weights in place, in closed form, and returns ``None``.

Both kinds share :class:`SwappedUNet`, which evaluates the UNet with some parameters replaced by other tensors
(``torch.func.functional_call``): a frozen teacher or an EMA teacher then costs a copy of the *trained subset*
only, never a second UNet.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch.func import functional_call

from metaunlearn.backbones.base import Backbone
from metaunlearn.config import StrictModel


@dataclass
class UnlearnInputs:
    """Everything a method may use: the model, what to erase, what to keep, the run's random generator, and the
    UNet subset the stage will train (``None``: the method's own default, :attr:`Method.trainable_subset`)."""

    backbone: Backbone
    forget_prompts: list[str]
    preserve_prompts: list[str] = field(default_factory=list)
    generator: torch.Generator = field(default_factory=lambda: torch.Generator("cpu").manual_seed(0))
    trainable_subset: str | None = None


class BaseLoss(Protocol):
    """A loss method's per-step objective (see the module docstring)."""

    trainable_subset: str

    def __call__(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss (with graph to the trainable UNet parameters) and named values to log."""

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. to update an EMA teacher)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must hold to resume bit-identically (empty if none)."""

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`."""


class Method(abc.ABC):
    """An unlearning method: ``Config`` (a :class:`StrictModel` with a default for every field) + :meth:`apply`."""

    name: ClassVar[str]
    Config: ClassVar[type[StrictModel]]
    kind: ClassVar[str]  # "loss" or "edit"
    default_lr: ClassVar[float] = 1e-5
    """Outer learning rate when the stage config does not set one (ESD/SDD: their papers' 1e-5 for SD)."""

    def __init__(self, config: StrictModel | Mapping[str, Any] | None = None) -> None:
        if config is None:
            config = self.Config()
        elif not isinstance(config, self.Config):
            config = self.Config.model_validate(dict(config))
        self.config = config
        self.edit_stats: dict[str, float] = {}
        """Edit methods record numbers worth logging here (e.g. RECE's per-epoch residuals)."""

    @property
    @abc.abstractmethod
    def trainable_subset(self) -> str:
        """Default UNet subset (:data:`~metaunlearn.backbones.base.TRAINABLE_SUBSETS`) trained after ``apply``."""

    def resolve_subset(self, inputs: UnlearnInputs) -> str:
        """The subset actually trained: the stage's override, else :attr:`trainable_subset`."""
        return inputs.trainable_subset or self.trainable_subset

    @abc.abstractmethod
    def apply(self, inputs: UnlearnInputs) -> BaseLoss | None:
        """Build the per-step loss (loss methods) or edit the UNet in place and return ``None`` (edit methods)."""

    def describe(self) -> str:
        """One line for logs and dry runs."""
        values = ", ".join(f"{k}={v}" for k, v in self.config.model_dump().items())
        return f"{self.name} ({values})"


class SwappedUNet:
    """Call ``unet`` with some of its parameters replaced by other tensors, keyed by the parameter objects.

    Keys are the ``nn.Parameter`` objects themselves (not names), so the mapping stays valid when module wrappers
    such as peft LoRA layers are inserted later and parameter names change.
    """

    def __init__(self, unet: torch.nn.Module, replacements: Mapping[torch.nn.Parameter, torch.Tensor]) -> None:
        self.unet = unet
        self.replacements = {id(p): value for p, value in replacements.items()}

    def parameters_by_name(self) -> dict[str, torch.Tensor]:
        return {
            name: self.replacements[id(p)]
            for name, p in self.unet.named_parameters()
            if id(p) in self.replacements
        }

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.unet, self.parameters_by_name(), args, kwargs, strict=False)


def frozen_copy(params: Iterable[torch.nn.Parameter]) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Detached clones of ``params`` keyed by the parameters (a teacher's weights)."""
    return {p: p.detach().clone() for p in params}


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error computed in at least float32 (float64 stays float64)."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return torch.nn.functional.mse_loss(pred.to(dtype), target.to(dtype))
