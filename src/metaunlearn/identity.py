"""What a result depends on, as fingerprints: model folders, data folders and files, by content.

A result (an attack's forget rate, an unlearned model) is a claim about particular weights and data, so stages
key their outputs by *content*, never by a folder's name:

* :func:`file_digest` — SHA-256 of a file's bytes. Files above :data:`CACHE_ABOVE` bytes (model weights) are hashed
  once and the digest is remembered in a small cache keyed by the file's resolved path, size, modification time,
  change time and inode. A rewritten file (new weights saved in place, a copy, an extracted archive) changes at
  least one of these — the change time cannot be set back by ``touch`` or ``tar`` — so a cached digest is never
  reused for other bytes, and an unchanged multi-gigabyte UNet is read from disk once (SD-1.4's 3.4 GB: a few
  seconds) instead of per command. Hashing only safetensors headers + sizes would be cheaper still but cannot
  tell two finetunes of one architecture apart (same header, same size).
* :func:`tree_digest` — every file of a folder (relative path + digest), hidden entries skipped.
* :func:`model_identity` — a model folder's resolved path, content fingerprint, and the base method and variant
  recorded by ``unlearn`` in the folder itself (:data:`PROVENANCE_FILE`).

The cache lives in ``$METAUNLEARN_CACHE`` or ``$XDG_CACHE_HOME/metaunlearn`` (``~/.cache/metaunlearn``); when it
cannot be written the digest is simply recomputed next time.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from metaunlearn.errors import UserError

CACHE_ABOVE = 1 << 20
PROVENANCE_FILE = "unlearn_config.json"
"""Written by ``unlearn`` at the root of the model folder it saves: method, variant (plain / meta), base model
identity and the resolved unlearn config. Plain diffusers ignores it."""
VARIANTS = ("base", "plain", "meta", "reference")


def cache_root() -> Path:
    if os.environ.get("METAUNLEARN_CACHE"):
        return Path(os.environ["METAUNLEARN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metaunlearn"


def _stream_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content (large files: cached by path, size, mtime, ctime and inode)."""
    path = Path(path).resolve()
    stat = path.stat()
    if stat.st_size <= CACHE_ABOVE:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}|{stat.st_dev}"
    entry = cache_root() / "digests" / hashlib.sha256(key.encode()).hexdigest()[:40]
    try:
        cached = entry.read_text().strip()
        if len(cached) == 64:
            return cached
    except OSError:
        pass
    digest = _stream_hash(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
        tmp.write_text(digest + "\n")
        os.replace(tmp, entry)
    except OSError:  # a read-only home: correct, only slower next time
        pass
    return digest


def tree_digest(folder: str | Path, skip: tuple[str, ...] = ()) -> str:
    """Digest of every file under ``folder`` (relative paths and contents; hidden entries and ``skip`` names out)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or rel.parts[0] in skip or not path.is_file():
            continue
        h.update(f"{rel.as_posix()}\0{file_digest(path)}\n".encode())
    return h.hexdigest()


def path_digest(path: str | Path) -> str:
    """Digest of a file or a folder (see :func:`file_digest`, :func:`tree_digest`)."""
    path = Path(path)
    if path.is_dir():
        return tree_digest(path)
    if path.is_file():
        return file_digest(path)
    raise UserError(f"not found: {path}")


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a result belongs to: where it is, what its weights are, and how it was made."""

    path: str
    fingerprint: str  # 16 hex digits of the digest of every file (weights, configs, tokenizer, scheduler)
    method: str  # the base method recorded by ``unlearn``; "base" for a model metaunlearn did not make
    variant: str  # base | plain | meta

    @property
    def label(self) -> str:
        """The default results name: ``<method>-<variant>`` (``base`` for a model not made by ``unlearn``)."""
        return "base" if self.variant == "base" else f"{self.method}-{self.variant}"

    def as_dict(self) -> dict:
        return asdict(self)


def read_provenance(model_dir: str | Path) -> dict | None:
    """The record ``unlearn`` wrote into a model folder, or ``None`` for any other model."""
    path = Path(model_dir) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON") from None
    if not isinstance(record, dict) or record.get("variant") not in ("plain", "meta") or not record.get("method"):
        raise UserError(f"{path} does not record a method and a variant (plain or meta)")
    return record


def model_identity(model_dir: str | Path) -> ModelIdentity:
    """Path, content fingerprint, method and variant of a diffusers model folder (validated first)."""
    from metaunlearn.backbones.loading import inspect_model_folder

    model_dir = Path(model_dir)
    inspect_model_folder(model_dir)
    record = read_provenance(model_dir)
    method, variant = (record["method"], record["variant"]) if record else ("base", "base")
    return ModelIdentity(str(model_dir.resolve()), tree_digest(model_dir)[:16], method, variant)


def module_digest(pipe) -> str:
    """Digest of an in-memory pipeline's weights (every ``torch.nn.Module`` component's state dict)."""
    import torch

    h = hashlib.sha256()
    for name, part in sorted(getattr(pipe, "components", {}).items()):
        if isinstance(part, torch.nn.Module):
            h.update(name.encode())
            for key, tensor in sorted(part.state_dict().items()):
                h.update(key.encode())
                h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
