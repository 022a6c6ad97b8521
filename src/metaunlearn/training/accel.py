"""The :class:`accelerate.Accelerator` every training stage runs on.

One process (``python``/``metaunlearn ...``) or many (``torchrun --nproc_per_node N`` or ``accelerate launch``):
the same code; accelerate reads the launcher's environment. Mixed precision is ``no``, ``bf16`` or ``fp16``; left
unset (``None``) it is the launcher's (``accelerate launch --mixed_precision bf16``), and the gradient accumulation
steps are ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` (``accelerate launch --gradient_accumulation_steps`` sets it for
DeepSpeed only). Without a GPU the processes of a launch form a gloo (CPU)
process group.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from metaunlearn.devices import resolve_device  # noqa: F401  (also importable from here)
from metaunlearn.errors import UserError

MIXED_PRECISION = ("no", "bf16", "fp16")


def make_accelerator(
    mixed_precision: str | None = "no", gradient_accumulation_steps: int | None = 1, cpu: bool = False
) -> Accelerator:
    """An Accelerator with these settings (``None``: the launcher's); ``cpu=True`` forces CPU even when a GPU is
    present, and is implied without one (else accelerate would not join the processes of a CPU launch).

    accelerate keeps one process-wide state and refuses a second Accelerator with other settings; several stages
    run in one process (e.g. unlearning then attacks), so a conflicting old state is dropped first — the process
    group of a distributed launch is kept.
    """
    cpu = cpu or not torch.cuda.is_available()
    if mixed_precision is None:  # resolved here, so a process-wide state left by another setting is replaced
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION:
        raise UserError(f"unknown mixed precision {mixed_precision!r} (choose {', '.join(MIXED_PRECISION)})")
    if gradient_accumulation_steps is None:
        gradient_accumulation_steps = launcher_accumulation()
    if gradient_accumulation_steps < 1:
        raise UserError("gradient_accumulation_steps must be at least 1")
    if mixed_precision == "bf16" and not cpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bf16; use mixed precision 'fp16' or 'no'")
    kwargs = dict(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps, cpu=cpu)
    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(**kwargs)


def launcher_accumulation() -> int:
    """Gradient accumulation steps from ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` (else 1)."""
    from accelerate.utils import parse_choice_from_env

    try:
        return int(parse_choice_from_env("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", 1))
    except ValueError:
        raise UserError("ACCELERATE_GRADIENT_ACCUMULATION_STEPS must be a whole number") from None


def stage_device(device: str, accelerator: Accelerator) -> str:
    """Where a training stage runs: ``device`` on one process; under a multi-process launch the launcher's
    device of this process (``auto``), or the CPU (``cpu``)."""
    if accelerator.num_processes == 1:
        return resolve_device(device)
    if device not in ("auto", "cpu") and torch.device(device) != accelerator.device:
        raise UserError(
            f"device {device!r} cannot be used by {accelerator.num_processes} processes: under torchrun or "
            "accelerate launch each process takes its own device (use device auto)"
        )
    return str(accelerator.device)
