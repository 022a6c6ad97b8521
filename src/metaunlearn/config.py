"""Typed configuration: YAML in, pydantic-validated, fully resolved JSON out.

Every section model derives from :class:`StrictModel`, so an unknown or mistyped key is an error naming the key
and the file rather than something silently ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from metaunlearn.errors import UserError

M = TypeVar("M", bound=BaseModel)

PACKAGE_DIR = Path(__file__).resolve().parent
TOY_SCHEME = "toy://"
TOY_ASSET_DIR = PACKAGE_DIR / "assets" / "toy"
TOY_ALIASES = {"detector": "detector.safetensors"}
"""``toy://NAME`` names a shipped toy asset (``toy://model``, ``toy://reference``, ``toy://detector``, sub-paths)."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys and non-finite numbers (nan, inf) are errors; values are validated
    on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, defer_build=True, allow_inf_nan=False)


def read_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping, or a one-line :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{path}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys to values")
    return _toy_paths_relative(data, path.resolve().parent, str(path))


def toy_asset(value: str | Path, source: str = "config") -> Path | None:
    """The shipped asset a ``toy://NAME`` value names (``toy:/NAME`` too: a path made of it), else ``None``."""
    text = str(value)
    if not text.startswith(TOY_SCHEME[:-1]):
        return None
    name = text[len(TOY_SCHEME[:-1]):].lstrip("/")
    parts = Path(name).parts
    if not parts or ".." in parts:
        raise UserError(f"{source}: {text!r} names no shipped toy asset (toy://model, toy://reference, toy://detector, ...)")
    return TOY_ASSET_DIR / TOY_ALIASES.get(name, name)


def _inside_package(folder: Path) -> bool:
    return folder == PACKAGE_DIR or PACKAGE_DIR in folder.parents


def _toy_paths_relative(data, base: Path, source: str):
    """Every ``toy://NAME`` string of a config file as the asset's path: absolute, or for a packaged config relative
    to its folder (``../assets/toy/NAME``, the paths its stage markers have always recorded)."""
    if isinstance(data, dict):
        return {k: _toy_paths_relative(v, base, source) for k, v in data.items()}
    if isinstance(data, list):
        return [_toy_paths_relative(v, base, source) for v in data]
    if isinstance(data, str) and data.startswith(TOY_SCHEME):
        asset = toy_asset(data, source)
        return os.path.relpath(asset, base) if _inside_package(base) else str(asset)
    return data


EXPERIMENT_SECTIONS = ("model", "run_dir", "data", "attack_data", "unlearn", "grid", "attack", "eval", "references",
                       "report")
"""The top-level keys of an experiment config (``ExperimentConfig``'s fields): every command's config file."""


def check_sections(data: dict, source: str) -> dict:
    """``data``, a config file's top level holding an experiment config's sections (a command reading some of them):
    any other top-level key is a one-line :class:`UserError`, as an unknown key inside a section is."""
    unknown = [key for key in data if key not in EXPERIMENT_SECTIONS]
    if unknown:
        raise UserError(f"{source}: unknown key '{unknown[0]}' (top-level sections: {', '.join(EXPERIMENT_SECTIONS)})")
    return data


def read_sections(path: str | Path) -> dict:
    """:func:`read_yaml` of a config file whose top level is sections (:func:`check_sections`)."""
    return check_sections(read_yaml(path), str(path))


def validation_message(exc: ValidationError, source: str) -> str:
    """One line naming the first offending key (dotted path) and what is wrong with it."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    if err["type"] == "missing":
        return f"{source}: missing required key '{key}'"
    return f"{source}: bad value for '{key}': {err['msg']}"


def validate(model_cls: type[M], data: dict, source: str) -> M:
    """``model_cls(**data)`` with a one-line :class:`UserError` naming the key and ``source`` on failure."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(validation_message(exc, source)) from None


def load_config(model_cls: type[M], path: str | Path) -> M:
    """Read and validate a YAML config file."""
    return validate(model_cls, read_yaml(path), str(path))


def write_resolved(config: BaseModel, path: str | Path) -> Path:
    """Write the fully resolved config (defaults filled in) as JSON next to a run's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(path)
    return path


def resolve_path(path: str | Path, base: str | Path | None) -> Path:
    """``path`` (``~`` expanded) if absolute, else relative to ``base`` — a config file's folder: every relative
    path in a config means the same thing in every command; ``toy://NAME`` is the shipped asset."""
    asset = toy_asset(path)
    if asset is not None:
        return asset
    p = Path(path).expanduser()
    return p if p.is_absolute() or base is None else Path(base) / p


def default_run_dir(config_path: str | Path, run_dir: str | Path | None = None) -> Path:
    """The run folder of a config file: its ``run_dir`` (relative to the file), else ``runs/<file name>`` in the
    working directory. A packaged config's relative ``run_dir`` is taken in the working directory: a run folder is
    never inside the installed package."""
    config_path = Path(config_path)
    if run_dir:
        base = config_path.resolve().parent
        return Path(run_dir).expanduser() if _inside_package(base) else resolve_path(run_dir, base)
    return Path("runs") / config_path.stem
