"""Device and dtype options shared by the stages and commands (torch is imported on use)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from metaunlearn.errors import UserError

if TYPE_CHECKING:
    import torch

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # option name -> torch dtype name


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is checked by torch."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:1, ...)") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but no CUDA GPU is available")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> fp16 on GPU, fp32 on CPU; otherwise one of :data:`DTYPES`."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (choose auto, {', '.join(DTYPES)})")
    return getattr(torch, DTYPES[dtype])


def finetune_dtypes(device: str) -> tuple[str, ...]:
    """The :data:`DTYPES` a finetuning attack can train in on ``device``: on the CPU fp32 only (the cached data are
    float32, and half-precision weights would drop updates below their resolution), on a GPU every one."""
    return ("fp32",) if device == "cpu" else tuple(DTYPES)


def check_finetune_dtype(dtype: str | torch.dtype, device: str) -> None:
    """Refuse (one line) a ``--dtype`` (or torch dtype) the attack cannot finetune in on ``device``, before anything
    is loaded."""
    if not isinstance(dtype, str):  # a torch dtype: its option name (float64 and others are the caller's choice)
        names = {torch_name: option for option, torch_name in DTYPES.items()}
        dtype = names.get(str(dtype).removeprefix("torch."), "auto")
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (choose auto, {', '.join(DTYPES)})")
    works = finetune_dtypes(device)
    if dtype != "auto" and dtype not in works:
        raise UserError(f"dtype {dtype} cannot finetune on {device}; what works there: {', '.join(works)}")
