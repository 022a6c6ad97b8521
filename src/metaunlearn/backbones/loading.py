"""Open a diffusers model folder as the right :class:`Backbone`, refusing anything that is not safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from metaunlearn.backbones.base import MARKER_FILE, Backbone
from metaunlearn.backbones.sd import StableDiffusionBackbone, ToyBackbone
from metaunlearn.backbones.sdxl import StableDiffusionXLBackbone
from metaunlearn.errors import UserError

PIPELINE_FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
BACKBONES: dict[str, type[Backbone]] = {
    "sd": StableDiffusionBackbone,
    "sdxl": StableDiffusionXLBackbone,
    "toy": ToyBackbone,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def inspect_model_folder(path: str | Path) -> tuple[str, bool]:
    """``(family, pixel_space)`` of a diffusers pipeline folder, or a :class:`UserError` saying what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model folder not found: {path}")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{index_file} is not valid JSON: {exc}") from None
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if class_name not in PIPELINE_FAMILIES:
        known = ", ".join(PIPELINE_FAMILIES)
        raise UserError(f"{path}: unsupported pipeline {class_name!r} (supported: {known})")
    listed = [name for name, entry in index.items()
              if not name.startswith("_") and isinstance(entry, list) and entry and entry[0] is not None]
    missing = [name for name in listed if not (path / name).is_dir()]
    if missing:
        folders = ", ".join(f"{name}/" for name in missing)
        raise UserError(f"model folder {path} has no {folders} (its model_index.json lists {', '.join(missing)})")
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        folder = path / component
        if not folder.is_dir():
            continue
        files = [f for f in folder.iterdir() if f.is_file()]
        if not any(f.suffix == ".safetensors" for f in files):
            pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
            what = f"{pickles[0]} is a pickle" if pickles else f"{folder} has no .safetensors weights"
            raise UserError(f"{what}; metaunlearn loads safetensors weights only")
    pixel_space = False
    marker = path / MARKER_FILE
    if marker.is_file():
        try:
            pixel_space = bool(json.loads(marker.read_text()).get("pixel_space", False))
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{marker} is not valid JSON") from None
    family = "toy" if pixel_space else PIPELINE_FAMILIES[class_name]
    return family, pixel_space


def load_backbone(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a pipeline folder (SD-1.x/2.x, SDXL or the toy model) as its backbone adapter."""
    from diffusers import DiffusionPipeline

    family, pixel_space = inspect_model_folder(path)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    except Exception as exc:  # diffusers raises many types; the user needs one line saying which folder failed
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model folder {path}: {message}") from None
    backbone = BACKBONES[family](pipe, source=path, pixel_space=pixel_space)
    return backbone.to(device)


def backbone_from_pipeline(pipe, pixel_space: bool | None = None) -> Backbone:
    """The backbone of a diffusers pipeline already in memory (its scheduler is switched to DDIM for sampling).

    ``pixel_space`` defaults to what the folder the pipeline was loaded from says (the toy model's marker file)."""
    class_name = type(pipe).__name__
    if class_name not in PIPELINE_FAMILIES:
        raise UserError(f"unsupported pipeline {class_name!r} (supported: {', '.join(PIPELINE_FAMILIES)})")
    source = getattr(getattr(pipe, "config", None), "_name_or_path", "") or "(in memory)"
    if pixel_space is None:
        marker = Path(source) / MARKER_FILE
        pixel_space = marker.is_file() and bool(json.loads(marker.read_text()).get("pixel_space", False))
    family = "toy" if pixel_space else PIPELINE_FAMILIES[class_name]
    return BACKBONES[family](pipe, source=source, pixel_space=pixel_space)


def backbone_for(model, device: str | None = None, dtype: torch.dtype = torch.float32) -> Backbone:
    """A backbone for a model folder or an in-memory diffusers pipeline."""
    from metaunlearn.progress import quiet_libraries

    quiet_libraries()  # diffusers' own loading bars; the stages show theirs

    if isinstance(model, (str, Path)):
        return load_backbone(model, device=device or "cpu", dtype=dtype)
    backbone = backbone_from_pipeline(model)
    return backbone.to(device) if device else backbone
