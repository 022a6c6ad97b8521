"""Image folders with captions in the Hugging Face ``imagefolder`` layout.

A data set is a folder of PNG files plus ``metadata.jsonl``, one JSON object per line::

    {"file_name": "000000.png", "text": "a photo of a dog"}

Reading validates everything a training stage would otherwise trip over later — a missing or empty folder, a
missing metadata file, a line without a caption, an image that is missing or cannot be decoded — and reports it as
one :class:`~metaunlearn.errors.UserError` naming the file. Writing is atomic (:func:`metaunlearn.atomic.atomic_directory`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from metaunlearn.atomic import atomic_directory
from metaunlearn.errors import UserError

METADATA_FILE = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageRecord:
    """One line of ``metadata.jsonl``."""

    file_name: str
    text: str


def read_metadata(folder: str | Path) -> list[ImageRecord]:
    """The validated records of an image folder (every listed image exists and has a caption)."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"data folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"data folder {folder} is a file, not a folder")
    meta = folder / METADATA_FILE
    if not meta.is_file():
        if not any(folder.iterdir()):
            raise UserError(f"data folder {folder} is empty")
        raise UserError(f"data folder {folder} has no {METADATA_FILE} (lines of {{\"file_name\": ..., \"text\": ...}})")
    try:
        lines = meta.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{meta} is not a UTF-8 text file") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{meta} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object with 'file_name' and 'text'")
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            raise UserError(f"{where}: missing 'file_name'")
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: image {name} has no caption ('text')")
        if not (folder / name).is_file():
            raise UserError(f"{where}: image file {folder / name} not found")
        records.append(ImageRecord(name, text))
    if not records:
        raise UserError(f"data folder {folder} is empty ({METADATA_FILE} lists no images)")
    return records


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """One RGB image ``[3,H,W]`` in [0,1]; centre-cropped to a square and resized to ``size`` when given."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None
    if size is not None and img.size != (size, size):
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def check_imagefolder(folder: str | Path) -> list[ImageRecord]:
    """Validate a folder completely: its metadata and that every image decodes (without keeping the pixels)."""
    folder = Path(folder)
    records = read_metadata(folder)
    for r in records:
        path = folder / r.file_name
        try:
            with Image.open(path) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise UserError(f"cannot read image {path}: {exc}") from None
    return records


def load_images(folder: str | Path, records: Sequence[ImageRecord], size: int | None = None) -> torch.Tensor:
    """Images of ``records`` stacked ``[N,3,H,W]`` in [0,1] (all must share a size unless ``size`` is given)."""
    folder = Path(folder)
    images = [load_image(folder / r.file_name, size) for r in records]
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise UserError(f"images in {folder} differ in size ({sorted(shapes)[:2]}); give a target size to resize them")
    return torch.stack(images)


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3,H,W]`` in [0,1] -> an 8-bit RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def write_records(folder: Path, records: Sequence[ImageRecord]) -> Path:
    """Write ``metadata.jsonl`` into an (unfinished) folder."""
    lines = [json.dumps({"file_name": r.file_name, "text": r.text}, ensure_ascii=False) for r in records]
    path = Path(folder) / METADATA_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def write_imagefolder(
    folder: str | Path, images: torch.Tensor | Sequence[torch.Tensor], texts: Sequence[str], extra: dict | None = None
) -> Path:
    """Write images (``[3,H,W]`` in [0,1]) and captions as an image folder, atomically replacing ``folder``.

    ``extra`` (JSON-able) is stored as ``generation.json`` beside the metadata (ignored by imagefolder readers).
    """
    if len(images) != len(texts):
        raise ValueError("one caption per image is required")
    with atomic_directory(folder) as tmp:
        records = []
        for i, (image, text) in enumerate(zip(images, texts)):
            name = f"{i:06d}.png"
            to_pil(image).save(tmp / name)
            records.append(ImageRecord(name, text))
        write_records(tmp, records)
        if extra is not None:
            (tmp / "generation.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
    return Path(folder)


@dataclass
class ImageFolder:
    """A loaded image folder: ``images`` ``[N,3,H,W]`` in [0,1], one caption per image."""

    path: Path
    images: torch.Tensor
    texts: list[str]
    files: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def read_imagefolder(folder: str | Path, size: int | None = None) -> ImageFolder:
    """Validate and load an image folder (resized to ``size`` x ``size`` when given)."""
    records = read_metadata(folder)
    images = load_images(folder, records, size)
    return ImageFolder(Path(folder), images, [r.text for r in records], [r.file_name for r in records])
