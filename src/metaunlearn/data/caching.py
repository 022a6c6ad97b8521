"""Encode an image folder once per backbone: latents + text conditioning, cached as a :class:`CachedSet`.

The cache key combines

* a **model fingerprint** of exactly what the encoding depends on: the VAE, text encoders and tokenizers (not the
  UNet, so an unlearned copy of a model shares its base model's cache), the pipeline class, the pixel-space marker,
  the resolution and the dtype. Files up to :data:`SMALL_FILE` bytes are hashed by content; larger weight files by
  size and modification time (hashing gigabytes per call would cost more than it saves).
* a **data fingerprint**: the content of ``metadata.jsonl`` and the name, size and mtime of every image it lists.

Changing either gives a new key, so a stale cache is never read. A backbone built in memory (no model folder)
is fingerprinted by hashing its encoder weights and tokenizer vocabularies directly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from metaunlearn.atomic import ensure_dir
from metaunlearn.backbones.base import MARKER_FILE, Backbone, cond_cat
from metaunlearn.data.cache import CachedSet
from metaunlearn.data.imagefolder import METADATA_FILE, load_images, read_metadata
from metaunlearn.errors import UserError
from metaunlearn.progress import progress_bar

SMALL_FILE = 1 << 20
ENCODER_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def _hash_file_or_stat(h: hashlib._Hash, path: Path, rel: str) -> None:
    stat = path.stat()
    h.update(rel.encode() + b"\0")
    if stat.st_size <= SMALL_FILE:
        h.update(hashlib.sha256(path.read_bytes()).digest())
    else:
        h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())


def folder_fingerprint(model_dir: str | Path, components: tuple[str, ...] | None = ENCODER_COMPONENTS) -> str:
    """Hash of a diffusers folder's ``model_index.json``, marker file and the files of ``components``
    (all subfolders when ``components`` is None)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for name in ("model_index.json", MARKER_FILE):
        if (model_dir / name).is_file():
            _hash_file_or_stat(h, model_dir / name, name)
    folders = sorted(p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        if components is not None and folder.name not in components:
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                _hash_file_or_stat(h, path, str(path.relative_to(model_dir)))
    return h.hexdigest()


def _module_fingerprint(backbone: Backbone, components: tuple[str, ...] = ENCODER_COMPONENTS) -> str:
    h = hashlib.sha256()
    for name in components:
        part = getattr(backbone.pipe, name, None)
        if part is None:
            continue
        h.update(name.encode())
        if isinstance(part, torch.nn.Module):
            for key, tensor in sorted(part.state_dict().items()):
                h.update(key.encode())
                h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif hasattr(part, "get_vocab"):
            h.update(json.dumps(part.get_vocab(), sort_keys=True).encode())
    return h.hexdigest()


def encoder_fingerprint(backbone: Backbone) -> str:
    """What a backbone's encodings depend on: encoder weights, tokenizers, family, resolution, dtype."""
    source = Path(backbone.source)
    base = folder_fingerprint(source) if (source / "model_index.json").is_file() else _module_fingerprint(backbone)
    extra = f"{backbone.family}|{backbone.pixel_space}|{backbone.resolution}|{backbone.dtype}"
    return hashlib.sha256(f"{base}|{extra}".encode()).hexdigest()


def model_fingerprint(backbone: Backbone) -> str:
    """What a backbone's *samples* depend on: every component, UNet included (the folder's files when it was loaded
    from a diffusers folder, else the weights in memory), family, resolution and dtype."""
    source = Path(backbone.source)
    if (source / "model_index.json").is_file():
        base = folder_fingerprint(source, None)
    else:
        base = _module_fingerprint(backbone, ("unet", *ENCODER_COMPONENTS))
    extra = f"{backbone.family}|{backbone.pixel_space}|{backbone.resolution}|{backbone.dtype}"
    return hashlib.sha256(f"{base}|{extra}".encode()).hexdigest()


def data_fingerprint(folder: str | Path) -> str:
    """Hash of ``metadata.jsonl`` and the name, size and mtime of every image it lists (validates the folder)."""
    folder = Path(folder)
    records = read_metadata(folder)
    h = hashlib.sha256((folder / METADATA_FILE).read_bytes())
    for r in records:
        stat = (folder / r.file_name).stat()
        h.update(f"{r.file_name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_file(backbone: Backbone, folder: str | Path, cache_dir: str | Path) -> Path:
    """Where the cache of ``folder`` encoded by ``backbone`` lives (name: ``<role>-<split>-<key>.safetensors``)."""
    folder = Path(folder).resolve()
    key = hashlib.sha256(f"{encoder_fingerprint(backbone)}|{data_fingerprint(folder)}".encode()).hexdigest()[:24]
    label = "-".join(p for p in (folder.parent.name, folder.name) if p)
    return Path(cache_dir) / f"{label}-{key}.safetensors"


@torch.no_grad()
def encode_folder(backbone: Backbone, folder: str | Path, batch_size: int = 16, progress: bool = True) -> CachedSet:
    """Encode every image (at the backbone's resolution) and caption of a validated image folder."""
    folder = Path(folder)
    records = read_metadata(folder)
    latents, conds = [], []
    with progress_bar("img", enabled=progress) as bar:
        task = bar.add_task(f"encoding {folder.parent.name}/{folder.name}", total=len(records), info="")
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            images = load_images(folder, chunk, size=backbone.resolution)
            latents.append(backbone.encode_images(images).float().cpu())
            conds.append({k: v.float().cpu() for k, v in backbone.encode_prompts([r.text for r in chunk]).items()})
            bar.advance(task, len(chunk))
    meta = {"folder": str(folder), "model": backbone.source, "family": backbone.family}
    # contiguous: a fresh set and one loaded back from the cache must feed the UNet the same memory layout
    return CachedSet(torch.cat(latents).contiguous(), cond_cat(conds), [r.text for r in records], meta)


def cached_set(
    backbone: Backbone, folder: str | Path, cache_dir: str | Path, batch_size: int = 16, progress: bool = True
) -> CachedSet:
    """The :class:`CachedSet` of ``folder`` under ``backbone``: loaded from ``cache_dir`` when the cache is current,
    otherwise computed and saved there. Tensors are float32 on the CPU."""
    path = cache_file(backbone, folder, cache_dir)
    if path.is_file():
        try:
            return CachedSet.load(path)
        except UserError:
            path.unlink(missing_ok=True)  # unreadable (e.g. truncated by a crash elsewhere): rebuild it
    ensure_dir(path.parent)
    data = encode_folder(backbone, folder, batch_size=batch_size, progress=progress)
    data.save(path)
    return data


def check_compatible(backbone: Backbone, data: CachedSet, where: str) -> None:
    """A :class:`UserError` if a cached set was encoded for a different kind of model."""
    unet = backbone.unet.config
    size = unet.sample_size if isinstance(unet.sample_size, int) else unet.sample_size[0]
    expected = (int(unet.in_channels), int(size), int(size))
    got = tuple(int(s) for s in data.latents.shape[1:])
    if got != expected:
        raise UserError(f"{where}: latents of shape {got} do not fit the model (expects {expected})")
    width = data.cond.get("encoder_hidden_states")
    if width is None or width.shape[-1] != int(unet.cross_attention_dim):
        raise UserError(f"{where}: text conditioning does not fit the model (encoded for another model family?)")
    if backbone.family == "sdxl" and not {"text_embeds", "time_ids"} <= set(data.cond):
        raise UserError(f"{where}: conditioning lacks SDXL's text_embeds/time_ids (encoded for another family)")


def load_set(backbone: Backbone, path: Path, cache_dir: Path, where: str, progress: bool) -> CachedSet:
    """A cached ``.safetensors`` set, or an image folder encoded once (and cached) by this backbone."""
    if not path.exists():
        raise UserError(f"{where}: data not found: {path}")
    if path.is_file() and path.suffix == ".safetensors":
        data = CachedSet.load(path)
    elif path.is_dir():
        data = cached_set(backbone, path, cache_dir, progress=progress)
    else:
        raise UserError(f"{where}: {path} is neither an image folder nor a cached .safetensors set")
    if len(data) == 0:
        raise UserError(f"{where}: {path} holds no images")
    check_compatible(backbone, data, f"{where} ({path})")
    return data.to(backbone.device)
