"""Prompt lists: inline (YAML list or a comma-separated CLI value) or from a prompt file.

Prompt files (one reader, :func:`read_prompt_rows`, for every command: data generation and evaluation alike):

* ``.txt`` — one prompt per line; blank lines and lines starting with ``#`` are skipped.
* ``.csv`` (UTF-8, with or without a byte-order mark) — a header row with a ``prompt`` column (as in the I2P
  benchmark CSVs); the other columns are kept per row (evaluation reads ``evaluation_seed``, ``evaluation_guidance``).
* ``.yaml`` / ``.yml`` / ``.json`` — a list of strings.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from metaunlearn.errors import UserError

PROMPT_FILE_SUFFIXES = (".txt", ".csv", ".yaml", ".yml", ".json")


def split_prompt_list(value: str) -> list[str]:
    """``"a dog, a cat"`` -> ``["a dog", "a cat"]`` (empty items dropped)."""
    return [p.strip() for p in value.split(",") if p.strip()]


def _check_list(items: object, path: Path) -> list[str]:
    if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
        raise UserError(f"prompt file {path} must contain a list of strings")
    return [p.strip() for p in items if p.strip()]


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a ``.txt``, ``.csv`` (``prompt`` column), ``.yaml`` or ``.json`` file."""
    return [row["prompt"] for row in read_prompt_rows(path)]


def read_prompt_rows(path: str | Path) -> list[dict[str, str]]:
    """One ``{"prompt": ..., <other CSV columns, lower case>: ...}`` per prompt of a prompt file (only ``prompt``
    outside CSV); a missing, empty or unreadable file is a one-line :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise UserError(f"prompt file {path}: unsupported type {suffix or '(none)'} (use {', '.join(PROMPT_FILE_SUFFIXES)})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not a UTF-8 text file") from None
    if suffix == ".csv":
        rows = _read_csv_rows(text, path)
        if not rows:
            raise UserError(f"prompt file {path} contains no prompts")
        return rows
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    elif suffix == ".json":
        try:
            prompts = _check_list(json.loads(text), path)
        except json.JSONDecodeError as exc:
            raise UserError(f"prompt file {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    else:
        try:
            prompts = _check_list(yaml.safe_load(text), path)
        except yaml.YAMLError as exc:
            raise UserError(f"prompt file {path} is not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not prompts:
        raise UserError(f"prompt file {path} contains no prompts")
    return [{"prompt": p} for p in prompts]


def _read_csv_rows(text: str, path: Path) -> list[dict[str, str]]:
    try:
        reader = csv.DictReader(text.splitlines())
        fields = reader.fieldnames or []
        if not any(f and f.strip().lower() == "prompt" for f in fields):
            shown = ", ".join(f for f in fields if f) or "none"
            raise UserError(f"prompt file {path} has no 'prompt' column (columns: {shown})")
        rows = []
        for row in reader:
            row = {k.strip().lower(): v.strip() for k, v in row.items() if isinstance(k, str) and isinstance(v, str)}
            if row.get("prompt"):
                rows.append(row)
        return rows
    except csv.Error as exc:
        raise UserError(f"prompt file {path} is not a readable CSV: {exc}") from None


def resolve_prompts(
    prompts: Sequence[str] | None, prompt_file: str | Path | None, what: str = "prompts"
) -> list[str]:
    """Prompts given inline or by file (exactly one of the two), or a :class:`UserError` naming ``what``."""
    if prompts and prompt_file:
        raise UserError(f"{what}: give either prompts or a prompt file, not both")
    if prompt_file:
        return read_prompt_file(prompt_file)
    cleaned = [p.strip() for p in (prompts or []) if p and p.strip()]
    if not cleaned:
        raise UserError(f"{what}: no prompts given (use a prompt list or a prompt file)")
    return cleaned
