"""The :class:`accelerate.Accelerator` every training stage runs on.

One process (``python``/``metaunlearn ...``) or many (``torchrun --nproc_per_node N`` or ``accelerate launch``):
the same code; accelerate reads the launcher's environment. Mixed precision is ``no``, ``bf16`` or ``fp16``.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from metaunlearn.errors import UserError

MIXED_PRECISION = ("no", "bf16", "fp16")


def make_accelerator(
    mixed_precision: str = "no", gradient_accumulation_steps: int = 1, cpu: bool = False
) -> Accelerator:
    """An Accelerator with these settings; ``cpu=True`` forces CPU even when a GPU is present.

    accelerate keeps one process-wide state and refuses a second Accelerator with other settings; several stages
    run in one process (e.g. unlearning then attacks), so a conflicting old state is dropped first — the process
    group of a distributed launch is kept.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise UserError(f"unknown mixed precision {mixed_precision!r} (choose {', '.join(MIXED_PRECISION)})")
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
