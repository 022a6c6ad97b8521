"""Checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint is a folder::

    checkpoint/
      state.json                         step, world size, what is stored
      module.<name>.safetensors          a module's trainable parameters (or all parameters and buffers)
      state.<name>.safetensors / .json   any object with state_dict()/load_state_dict(): optimizer, LR scheduler,
                                         gradient scaler — tensors go to safetensors, scalars and structure to JSON
      rng.rank<r>.safetensors / .json    torch CPU/CUDA generator states and named generators (uint8 tensors);
                                         Python and NumPy RNG states (JSON)

:func:`encode_state` / :func:`decode_state` turn a nested ``state_dict`` (dicts with int keys, tuples, tensors,
numbers) into a JSON document plus a flat tensor dict and back, exactly: restoring gives the same values, dtypes
and container types, so resumed training continues bit for bit.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from metaunlearn.errors import UserError, as_os_error, is_io_error

STATE_FILE = "state.json"
FORMAT_VERSION = 1


# ---- nested state <-> (JSON, tensors) --------------------------------------------------------------------------
def encode_state(obj: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    """A JSON-able copy of ``obj`` with every tensor moved into ``tensors`` (keyed by its path)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        items = [
            [encode_state(k, tensors, f"{path}.k{i}"), encode_state(v, tensors, f"{path}.{i}")]
            for i, (k, v) in enumerate(obj.items())
        ]
        return {"__dict__": items}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {path} in a checkpoint")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {decode_state(k, tensors): decode_state(v, tensors) for k, v in obj["__dict__"]}
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    return obj


def save_state(folder: Path, name: str, state: Any) -> None:
    """Write ``state`` as ``<name>.safetensors`` (its tensors) + ``<name>.json`` (the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    document = encode_state(state, tensors)
    try:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    except Exception as exc:  # safetensors reports a full disk as SafetensorError, not OSError
        if is_io_error(exc):
            raise as_os_error(exc, folder / f"{name}.safetensors") from None
        raise
    (folder / f"{name}.json").write_text(json.dumps(document))


def load_state(folder: Path, name: str) -> Any:
    """Read what :func:`save_state` wrote."""
    try:
        tensors = load_file(str(folder / f"{name}.safetensors"))
        document = json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint {folder} is damaged ({name}: {exc}); delete it to start over") from None
    return decode_state(document, tensors)


# ---- modules ------------------------------------------------------------------------------------------------------
def module_tensors(module: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Parameters with ``requires_grad`` (or all parameters and buffers) by name, detached CPU copies."""
    if trainable_only:
        items = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    else:
        items = list(module.state_dict(keep_vars=True).items())
    return {n: t.detach().cpu().contiguous().clone() for n, t in items}


@torch.no_grad()
def load_module_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor], trainable_only: bool, where: str) -> None:
    """Copy ``tensors`` into ``module`` in place; the set of names must match what :func:`module_tensors` gives."""
    if trainable_only:
        targets = {n: p for n, p in module.named_parameters() if p.requires_grad}
    else:
        targets = dict(module.state_dict(keep_vars=True))
    if set(targets) != set(tensors):
        missing = sorted(set(targets) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(targets))[:3]
        raise UserError(
            f"checkpoint {where} does not match this run (missing {missing}, unexpected {extra}); "
            "it was written with other settings — delete it or use another output folder"
        )
    for name, target in targets.items():
        if target.shape != tensors[name].shape:
            raise UserError(f"checkpoint {where}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(target.shape)}")
        target.copy_(tensors[name])


# ---- random number generators ------------------------------------------------------------------------------------
def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG state of this process: torch CPU (+ CUDA), named generators, Python ``random``, NumPy."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_step(folder: Path) -> dict:
    """The ``state.json`` of a checkpoint folder."""
    try:
        record = json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"checkpoint {folder} has no readable {STATE_FILE}; delete it to start over") from None
    if record.get("format") != FORMAT_VERSION:
        raise UserError(f"checkpoint {folder} has format {record.get('format')}, expected {FORMAT_VERSION}")
    return record
