"""The models of an experiment's grid and the stages that make them (what waits for what)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metaunlearn.experiment.config import GridMethod


@dataclass
class GridModel:
    """One model of the comparison."""

    name: str
    method: str
    variant: str  # base | plain | meta | control | reference
    entry: GridMethod | None = None
    seed: int = 0  # the grid seed (replicate) this model belongs to
    folder: Path | None = None  # a reference's model folder (given, never built)

    @property
    def key(self) -> str:
        """Folder and stage name: the model's name, with ``.s<seed>`` for replicates other than seed 0."""
        return self.name if self.seed == 0 else f"{self.name}.s{self.seed}"

    @property
    def from_plain(self) -> bool:
        """A meta variant whose grid entry says ``meta_from_plain``: it starts from (and waits for) its plain twin."""
        return self.variant == "meta" and self.entry is not None and self.entry.meta_from_plain

    def plain_twin(self) -> GridModel:
        """The plain model of the same grid entry and seed (a ``meta_from_plain`` meta variant starts from it)."""
        assert self.entry is not None
        return GridModel(f"{self.entry.model_label}-plain", self.method, "plain", self.entry, self.seed)


@dataclass(frozen=True)
class Task:
    """An unlearn or attack stage of one grid model and the stages it must wait for."""

    stage: str  # unlearn-<key> | attack-<key>
    kind: str  # unlearn | attack
    model: GridModel
    after: tuple[str, ...] = ()
    overwrite: bool = False  # redo it if it ran with other settings (travels with the task to worker processes)
