"""The training loop every stage (unlearning, meta-unlearning, attacks) runs through.

A stage builds its model and optimizer, hands them to :meth:`TrainLoop.prepare` (accelerate places them, wraps the
model for data parallel training and applies mixed precision) and gives :meth:`TrainLoop.run` a ``step_fn``::

    loop = TrainLoop(out_dir, steps=200, checkpoint_every=50, seed=0)
    unet, optimizer = loop.prepare(unet=backbone.unet, optimizer=torch.optim.AdamW(params, lr=1e-5))

    def step_fn(step: int) -> dict[str, float]:
        idx = torch.randint(len(data), (8,), generator=loop.generator)
        x0, cond = data.batch(idx)
        loss = denoising_loss(backbone, x0, cond, unet=unet, generator=loop.generator)
        loop.accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return {"loss": loss.item()}

    result = loop.run(step_fn)           # resumes from out_dir/checkpoint if there is one

The loop owns everything around the step: the progress bar (loss terms, rate, ETA), the JSONL training log, atomic
checkpoints every ``checkpoint_every`` steps and at the end, resuming, gradient accumulation (``step_fn`` is called
``gradient_accumulation_steps`` times per step inside ``accelerator.accumulate``; the prepared optimizer only steps
on the last call) and stopping with a clear message when a loss term becomes NaN or infinite, or when a step leaves
a trained parameter NaN or infinite (a finite loss at a huge learning rate): a checkpoint never holds non-finite
weights or optimizer state, so the last good checkpoint is one from before the divergence.

Two kinds of data parallelism under ``torchrun``/``accelerate launch``: by default each process draws its own
random numbers (``loop.generator`` is seeded per rank) and a prepared (DDP) model averages the gradients. With
``split_batches=True`` every process draws the *same* numbers (the generator is seeded alike on every rank) and
``step_fn`` computes its share of each global batch through :attr:`TrainLoop.shard`
(:mod:`metaunlearn.training.parallel`), summing gradients itself; ``step_fn`` is then called once per step and the
gradient accumulation steps become the shard's micro-batches. The update is then the same for any number of
processes, and a checkpoint resumes under any number of processes.

Steps count from 1; the checkpoint at step K holds the state after K steps. Draw random numbers from
``loop.generator`` (or torch's global RNG): both are checkpointed, so on CPU a resumed run ends bit-identical to an
uninterrupted one. State a stage keeps outside the prepared objects (an EMA teacher, an extra generator) must be
registered with :meth:`TrainLoop.track` to be checkpointed too.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from pydantic import Field

from metaunlearn.atomic import ensure_dir, recover_directory, replace_directory
from metaunlearn.config import StrictModel
from metaunlearn.errors import UserError
from metaunlearn.progress import progress_bar
from metaunlearn.training.accel import make_accelerator
from metaunlearn.training.checkpoint import (
    FORMAT_VERSION,
    STATE_FILE,
    load_module_tensors,
    load_state,
    module_tensors,
    read_step,
    rng_state,
    save_state,
    set_rng_state,
)
from metaunlearn.training.finite import diverged_message, diverged_weights_message, first_nonfinite, state_tensors
from metaunlearn.training.parallel import Shard

CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "train_log.jsonl"
StepFn = Callable[[int], dict[str, float]]


class TrainingSettings(StrictModel):
    """Loop settings a stage config embeds (e.g. as its ``training:`` section)."""

    steps: int = Field(100, ge=1, description="optimizer steps")
    checkpoint_every: int = Field(50, ge=0, description="checkpoint interval in steps (0: only at the end)")
    log_every: int = Field(1, ge=1, description="write a training-log line every N steps")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast precision")
    gradient_accumulation_steps: int = Field(1, ge=1, description="step_fn calls per optimizer step")
    seed: int = Field(0, description="seed of the global RNG and of loop.generator (offset by process rank)")


class TrainingDiverged(UserError):
    """A loss term or a trained parameter became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What :meth:`TrainLoop.run` did."""

    step: int
    terms: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    checkpoint: Path | None = None


@dataclass
class _Tracked:
    modules: dict[str, tuple[torch.nn.Module, bool]] = field(default_factory=dict)
    states: dict[str, Any] = field(default_factory=dict)
    generators: dict[str, torch.Generator] = field(default_factory=dict)

    def names(self) -> set[str]:
        return set(self.modules) | set(self.states) | set(self.generators)


class TrainLoop:
    """Progress, logging, checkpoints, resume, gradient accumulation and NaN checks around a stage's ``step_fn``."""

    def __init__(
        self,
        out_dir: str | Path,
        steps: int,
        *,
        checkpoint_every: int = 50,
        log_every: int = 1,
        seed: int = 0,
        mixed_precision: str = "no",
        gradient_accumulation_steps: int = 1,
        accelerator: Accelerator | None = None,
        cpu: bool = False,
        description: str = "training",
        progress: bool = True,
        split_batches: bool = False,
    ) -> None:
        if steps < 1:
            raise UserError("training needs at least 1 step")
        self.out_dir = ensure_dir(out_dir)
        self.steps = steps
        self.checkpoint_every = checkpoint_every
        self.log_every = log_every
        self.seed = seed
        self.description = description
        self.accelerator = accelerator or make_accelerator(mixed_precision, gradient_accumulation_steps, cpu=cpu)
        self.show_progress = progress and self.accelerator.is_main_process
        self.split_batches = split_batches
        rank = 0 if split_batches else self.accelerator.process_index
        set_seed(seed + rank)
        self.generator = torch.Generator().manual_seed(10_007 * (seed + 1) + rank)
        """CPU generator for batch indices, noise and timesteps; per process (alike with ``split_batches``),
        checkpointed."""
        self._tracked = _Tracked()
        self._tracked.generators["loop"] = self.generator
        self._models: list[torch.nn.Module] = []

    @classmethod
    def from_settings(cls, out_dir: str | Path, settings: TrainingSettings, **kwargs: Any) -> TrainLoop:
        """A loop configured by a :class:`TrainingSettings` section."""
        return cls(
            out_dir,
            settings.steps,
            checkpoint_every=settings.checkpoint_every,
            log_every=settings.log_every,
            seed=settings.seed,
            mixed_precision=settings.mixed_precision,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            **kwargs,
        )

    # ---- set-up ---------------------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / CHECKPOINT_DIR

    @property
    def log_file(self) -> Path:
        return self.out_dir / LOG_FILE

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def shard(self) -> Shard:
        """This process's share of every global batch (``split_batches``; see the module docstring)."""
        return Shard.of(self.accelerator)

    def prepare(self, **objects: Any) -> Any:
        """``accelerator.prepare`` the named objects (models, optimizers, schedulers) and checkpoint them under
        those names: a model's trainable parameters, the others' ``state_dict``. Returns them in order."""
        prepared = self.accelerator.prepare(*objects.values())
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        for name, obj in zip(objects, prepared):
            self.track(name, obj)
            if isinstance(obj, torch.nn.Module):
                self._models.append(obj)
        if self.accelerator.scaler is not None and "grad_scaler" not in self._tracked.states:
            self.track("grad_scaler", self.accelerator.scaler)
        return prepared[0] if len(prepared) == 1 else prepared

    def track(self, name: str, obj: Any, trainable_only: bool = True) -> Any:
        """Checkpoint ``obj`` too: a module (its trainable parameters, or everything with ``trainable_only=False``),
        a ``torch.Generator``, or anything with ``state_dict``/``load_state_dict``."""
        if name in self._tracked.names():
            raise ValueError(f"'{name}' is already tracked")
        if isinstance(obj, torch.nn.Module):
            self._tracked.modules[name] = (obj, trainable_only)
        elif isinstance(obj, torch.Generator):
            self._tracked.generators[name] = obj
        elif hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
            self._tracked.states[name] = obj
        else:
            raise TypeError(f"cannot checkpoint {name!r} ({type(obj).__name__})")
        return obj

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The plain module inside a prepared (e.g. DistributedDataParallel) one."""
        return self.accelerator.unwrap_model(model)

    # ---- checkpoints ------------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        """Write the checkpoint of step ``step`` atomically (every process must call this)."""
        acc = self.accelerator
        tmp = self.out_dir / f".{CHECKPOINT_DIR}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        save_state(tmp, f"rng.rank{acc.process_index}", rng_state(self._tracked.generators))
        if acc.is_main_process:
            from safetensors.torch import save_file

            for name, (module, trainable_only) in self._tracked.modules.items():
                save_file(module_tensors(self.unwrap(module), trainable_only), str(tmp / f"module.{name}.safetensors"))
            for name, obj in self._tracked.states.items():
                save_state(tmp, f"state.{name}", obj.state_dict())
            record = {
                "format": FORMAT_VERSION,
                "step": step,
                "total_steps": self.steps,
                "world_size": acc.num_processes,
                "modules": {n: trainable for n, (_, trainable) in self._tracked.modules.items()},
                "states": sorted(self._tracked.states),
                "generators": sorted(self._tracked.generators),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        acc.wait_for_everyone()
        if acc.is_main_process:
            replace_directory(tmp, self.checkpoint_dir)
        acc.wait_for_everyone()
        return self.checkpoint_dir

    def checkpoint_step(self) -> int | None:
        """The step of the existing checkpoint, or ``None``."""
        if self.is_main:
            recover_directory(self.checkpoint_dir)
        self.accelerator.wait_for_everyone()
        if not (self.checkpoint_dir / STATE_FILE).is_file():
            return None
        return int(read_step(self.checkpoint_dir)["step"])

    def load_checkpoint(self) -> int:
        """Restore every tracked object and RNG from the checkpoint; returns its step."""
        folder = self.checkpoint_dir
        record = read_step(folder)
        expected = set(self._tracked.modules) | set(self._tracked.states)
        stored = set(record["modules"]) | set(record["states"])
        if expected != stored:
            raise UserError(
                f"checkpoint {folder} holds {sorted(stored)} but this run trains {sorted(expected)}; "
                "delete it or use another output folder"
            )
        from safetensors.torch import load_file

        for name, (module, trainable_only) in self._tracked.modules.items():
            tensors = load_file(str(folder / f"module.{name}.safetensors"))
            load_module_tensors(self.unwrap(module), tensors, trainable_only, f"{folder} ({name})")
        for name, obj in self._tracked.states.items():
            obj.load_state_dict(load_state(folder, f"state.{name}"))
        rank = 0 if self.split_batches else self.accelerator.process_index  # split batches: one stream for all
        if (folder / f"rng.rank{rank}.json").is_file():
            set_rng_state(load_state(folder, f"rng.rank{rank}"), self._tracked.generators)
        else:  # resumed with more processes than before: a fresh but deterministic stream for the new rank
            set_seed(self.seed + rank + 1_000 * int(record["step"]))
            self.generator.manual_seed(10_007 * (self.seed + 1) + rank + 1_000 * int(record["step"]))
        return int(record["step"])

    # ---- the loop -------------------------------------------------------------------------------------------------
    def run(self, step_fn: StepFn, resume: bool = True) -> TrainResult:
        """Call ``step_fn(step)`` for the remaining steps (from the checkpoint when ``resume``)."""
        start = 0
        if self.checkpoint_step() is not None:
            if resume:
                start = self.load_checkpoint()
            elif self.is_main:  # an explicit restart: an old checkpoint must not be resumed later by mistake
                shutil.rmtree(self.checkpoint_dir)
        self.accelerator.wait_for_everyone()
        self._trim_log(start)
        terms: dict[str, float] = {}
        if start >= self.steps:
            return TrainResult(start, terms, resumed_from=start, checkpoint=self.checkpoint_dir)
        last_good = self.checkpoint_dir if start > 0 else None
        began = time.time()
        with progress_bar("step", enabled=self.show_progress) as bar:
            task = bar.add_task(self.description, total=self.steps, completed=start, info="")
            for step in range(start + 1, self.steps + 1):
                terms = self._step(step_fn, step)
                bad = [k for k, v in terms.items() if not math.isfinite(v)]
                if bad:
                    raise TrainingDiverged(diverged_message(bad[0], terms[bad[0]], step, last_good))
                saving = step == self.steps or (self.checkpoint_every and step % self.checkpoint_every == 0)
                broken = self._nonfinite_tensor(everything=bool(saving))
                if broken is not None:
                    raise TrainingDiverged(diverged_weights_message(broken, step, last_good))
                if self.is_main and (step % self.log_every == 0 or step == self.steps):
                    self._log({"step": step, **terms, "elapsed_s": round(time.time() - began, 3)})
                bar.update(task, advance=1, info=" ".join(f"{k} {v:.4g}" for k, v in terms.items()))
                if saving:
                    last_good = self.save_checkpoint(step)
        return TrainResult(self.steps, terms, resumed_from=start, checkpoint=last_good)

    def _step(self, step_fn: StepFn, step: int) -> dict[str, float]:
        """One optimizer step: ``gradient_accumulation_steps`` calls of ``step_fn``; terms averaged over calls and
        processes."""
        calls = 1 if self.split_batches else self.accelerator.gradient_accumulation_steps
        sums: dict[str, float] = {}
        for _ in range(calls):
            with self.accelerator.accumulate(*self._models):
                out = step_fn(step)
            if not isinstance(out, dict) or not out:
                raise TypeError("step_fn must return a non-empty dict of loss terms")
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        names = sorted(sums)
        values = torch.tensor([sums[k] / calls for k in names], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        return {k: float(v) for k, v in zip(names, values.tolist())}

    def _nonfinite_tensor(self, everything: bool) -> str | None:
        """The name of a tracked tensor holding NaN or inf, or None: the trained parameters of every tracked module,
        and with ``everything`` whatever a checkpoint saves (frozen tensors of full modules, optimizer state)."""
        named: list[tuple[str, torch.Tensor]] = []
        for name, (module, trainable_only) in self._tracked.modules.items():
            module = self.unwrap(module)
            if everything and not trainable_only:
                named += [(f"{name}.{k}", v) for k, v in module.state_dict(keep_vars=True).items()]
            else:
                named += [(f"{name}.{k}", p) for k, p in module.named_parameters() if p.requires_grad]
        if everything:
            for name, obj in self._tracked.states.items():
                named += [(f"{name}.{k}", v) for k, v in state_tensors(obj.state_dict())]
        return first_nonfinite(named)

    # ---- training log ---------------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        with self.log_file.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _trim_log(self, start: int) -> None:
        """Drop log lines of steps after ``start`` (they are about to be redone), or the whole log on a fresh start."""
        if not self.is_main or not self.log_file.exists():
            return
        kept = []
        if start > 0:
            for line in self.log_file.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a crash
        tmp = self.log_file.with_name(f".{LOG_FILE}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.log_file)


def read_log(out_dir: str | Path) -> list[dict]:
    """The training log of a loop's output folder."""
    path = Path(out_dir) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_step(out_dir: str | Path) -> int | None:
    """The step of the checkpoint in a loop's output folder, or ``None`` when there is none."""
    folder = recover_directory(Path(out_dir) / CHECKPOINT_DIR)
    if not (folder / STATE_FILE).is_file():
        return None
    return int(read_step(folder)["step"])
