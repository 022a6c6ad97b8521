"""Make concept data sets by sampling the base model itself.

:func:`generate_folder` samples ``images_per_prompt`` images for each prompt and writes one image folder;
:func:`generate_role` and :func:`generate_data` do this for the roles and splits a :class:`DataConfig` names.

Image ``i`` of a generation (prompt-major order: every image of prompt 0, then prompt 1, ...) uses sampler seed
``seed + i``, so the result does not depend on the batch size. Each folder records its settings (the generating
model's content fingerprint, seed, sampler, prompts) in the stage marker ``stages/generate.json`` that every stage
uses (:class:`metaunlearn.runs.RunDir`). A run killed part-way resumes image by image from the temporary folder it
left (``.<folder>.tmp-<settings key>``). Asking again for the same settings is a no-op, asking for different ones
into an existing folder needs ``overwrite=True`` and the refusal names the changed keys. Folders are written atomically: a good folder is never replaced by a partial one.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from metaunlearn.atomic import atomic_write_bytes, ensure_dir, replace_directory, usual_mode
from metaunlearn.backbones.base import Backbone
from metaunlearn.data.config import SPLITS, DataConfig, SamplerSettings
from metaunlearn.data.imagefolder import ImageRecord, check_imagefolder, read_metadata, to_pil, write_records
from metaunlearn.data.prompts import resolve_prompts
from metaunlearn.errors import UserError
from metaunlearn.progress import progress_bar
from metaunlearn.runs import RunDir

STAGE = "generate"
"""The folder's stage marker (``stages/generate.json``, see :class:`metaunlearn.runs.RunDir`) holds the settings."""


def model_identity(backbone: Backbone) -> dict:
    """Resolved path and content fingerprint of every file of the model that generates the data (a digest of
    its weights for a pipeline only in memory)."""
    from metaunlearn.identity import module_digest, tree_digest

    source = Path(backbone.source)
    if (source / "model_index.json").is_file():
        return {"path": str(source.resolve()), "fingerprint": tree_digest(source)[:16]}
    return {"path": None, "fingerprint": module_digest(backbone.pipe)[:16]}


def _spec(backbone: Backbone, items: Sequence[tuple[str, str]], seed: int, sampler: SamplerSettings) -> dict:
    return {
        "model": model_identity(backbone),
        "seed": seed,
        "sampler": sampler.model_dump(mode="json"),
        "images": [{"text": text, "split": split} for text, split in items],
    }


def _split_spec(spec: dict, split: str) -> dict:
    return {**spec, "split": split}


def _status(folder: Path, spec: dict):
    """The folder's :class:`~metaunlearn.runs.StageStatus` against ``spec`` (done only with readable images)."""
    from metaunlearn.runs import RunDir, StageStatus

    status = RunDir(folder, create=False).status(STAGE, spec, outputs=[folder])
    if status.state == "done":
        try:
            read_metadata(folder)
        except UserError:
            return StageStatus("changed", ["(its images are incomplete)"])
    return status


def _is_current(folder: Path, spec: dict) -> bool:
    """``folder`` is a valid image folder generated with exactly ``spec``."""
    return _status(folder, spec).state == "done"


def _difference(folder: Path, spec: dict) -> str:
    """Which generation settings of an existing folder differ from ``spec`` (for the error message)."""
    return f"{_status(folder, spec).describe()} changed"


def _check_replaceable(folder: Path, spec: dict, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output {folder} is a file, not a folder")
    if folder.exists() and not overwrite:
        raise UserError(
            f"{folder} already exists and was not generated with these settings ({_difference(folder, spec)}); "
            "pass --overwrite to replace it"
        )
    if folder.is_dir() and any(folder.iterdir()) and RunDir(folder, create=False).record(STAGE) is None:
        from metaunlearn.runs import refuse_foreign

        refuse_foreign(folder, sorted(folder.iterdir()), f"cannot replace {folder}")


def image_names(items: Sequence[tuple[str, str]]) -> list[str]:
    """The file name of each item's image in its split folder (``000000.png``, ... per split, in item order)."""
    counters: dict[str, int] = {}
    names = []
    for _, split in items:
        names.append(f"{counters.get(split, 0):06d}.png")
        counters[split] = counters.get(split, 0) + 1
    return names


def sample_items(
    backbone: Backbone,
    items: Sequence[tuple[str, str]],
    seed: int,
    sampler: SamplerSettings,
    out: dict[str, Path],
    *,
    progress: bool = True,
    description: str = "generating",
) -> dict[str, list[ImageRecord]]:
    """Sample one image per ``(prompt, split)`` item (image ``i`` with seed ``seed + i``) and save it as a PNG into
    ``out[split]``; returns each split's records in order. Images already in ``out`` (an interrupted run's) are
    kept: each is written whole through a rename, and its seed depends on its index alone."""
    names = image_names(items)
    for folder in out.values():  # a write a kill interrupted before its rename
        for stray in folder.glob(".*.png.*"):
            stray.unlink()
    todo = [i for i, (_, split) in enumerate(items) if not (out[split] / names[i]).is_file()]
    with progress_bar("img", enabled=progress) as bar:
        task = bar.add_task(description, total=len(items), info="")
        bar.advance(task, len(items) - len(todo))
        for start in range(0, len(todo), sampler.batch_size):
            chunk = todo[start : start + sampler.batch_size]
            images = backbone.sample(
                [items[i][0] for i in chunk],
                steps=sampler.steps,
                guidance=sampler.guidance,
                negative_prompt=sampler.negative_prompt,
                seeds=[seed + i for i in chunk],
                height=sampler.resolution,
                width=sampler.resolution,
                batch_size=len(chunk),
            )
            if not torch.isfinite(images).all():
                raise UserError(f"the model produced non-finite images for {items[chunk[0]][0]!r}; check the model weights")
            for image, i in zip(images, chunk):
                buffer = io.BytesIO()
                to_pil(image).save(buffer, format="PNG")
                atomic_write_bytes(out[items[i][1]] / names[i], buffer.getvalue())
            bar.advance(task, len(chunk))
    records: dict[str, list[ImageRecord]] = {split: [] for split in out}
    for (text, split), name in zip(items, names):
        records[split].append(ImageRecord(name, text))
    return records


def _resume_dir(folder: Path, spec: dict) -> Path:
    """The temporary folder of ``folder``'s generation with ``spec``: an interrupted run's, when it left one with
    these settings (its images are kept), else a new one; those of other settings are deleted."""
    from metaunlearn.runs import settings_key

    path = folder.parent / f".{folder.name}.tmp-{settings_key(spec)}"
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        if stale != path:
            shutil.rmtree(stale, ignore_errors=True)
    record = RunDir(path, create=False).record(STAGE) if path.is_dir() else None
    if record is None or record.get("settings_key") != settings_key(spec):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=usual_mode(directory=True))
        path.chmod(usual_mode(directory=True))
        RunDir(path, create=False).begin(STAGE, spec)
    return path


def _write_splits(
    backbone: Backbone,
    items: list[tuple[str, str]],
    seed: int,
    sampler: SamplerSettings,
    targets: dict[str, Path],
    overwrite: bool,
    progress: bool,
    description: str,
) -> dict[str, Path]:
    """Generate ``items`` into the split folders ``targets``, skipping the work when all are already current."""
    spec = _spec(backbone, items, seed, sampler)
    if all(_is_current(folder, _split_spec(spec, split)) for split, folder in targets.items()):
        return targets
    for split, folder in targets.items():
        if not _is_current(folder, _split_spec(spec, split)):  # a split a killed run had already put in place
            _check_replaceable(folder, _split_spec(spec, split), overwrite)
        ensure_dir(folder.parent)
    tmps = {split: _resume_dir(f, _split_spec(spec, split)) for split, f in targets.items()}
    try:
        records = sample_items(backbone, items, seed, sampler, tmps, progress=progress, description=description)
        for split, tmp in tmps.items():
            write_records(tmp, records[split])
            RunDir(tmp, create=False).mark_done(STAGE, _split_spec(spec, split))
        for split, tmp in tmps.items():
            replace_directory(tmp, targets[split])
    finally:
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)
    return targets


def generate_folder(
    backbone: Backbone,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    images_per_prompt: int = 1,
    seed: int = 0,
    sampler: SamplerSettings | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Sample ``images_per_prompt`` images per prompt into the image folder ``out_dir`` (atomic)."""
    if images_per_prompt < 1:
        raise UserError("images per prompt must be at least 1")
    prompts = resolve_prompts(prompts, None)
    items = [(p, "all") for p in prompts for _ in range(images_per_prompt)]
    out_dir = Path(out_dir)
    _write_splits(
        backbone, items, seed, sampler or SamplerSettings(), {"all": out_dir}, overwrite, progress, f"generating {out_dir.name}"
    )
    return out_dir


def split_items(
    train_prompts: Sequence[str],
    test_prompts: Sequence[str] | None,
    images_per_prompt: int,
    test_fraction: float,
    seed: int,
) -> list[tuple[str, str]]:
    """``(prompt, split)`` for every image to generate for one role, in generation order.

    With ``test_prompts`` the test split holds their images; otherwise a seeded random ``test_fraction`` of the
    images of ``train_prompts`` (at least one image each way when there are two or more images and the fraction
    is positive).
    """
    items = [(p, "train") for p in train_prompts for _ in range(images_per_prompt)]
    if test_prompts:
        return items + [(p, "test") for p in test_prompts for _ in range(images_per_prompt)]
    n = len(items)
    n_test = round(test_fraction * n)
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    if n_test == 0:
        raise UserError(
            f"{n} image(s) cannot be split into train and test; raise images_per_prompt or test_fraction, "
            "or give test_prompts"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    test = set(order[:n_test])
    return [(p, "test" if i in test else "train") for i, (p, _) in enumerate(items)]


def generate_role(
    backbone: Backbone, config: DataConfig, role: str, *, overwrite: bool = False, progress: bool = True
) -> dict[str, Path]:
    """Generate (or validate, for a user ``folder``) the train and test folders of one role."""
    spec = config.role(role)
    targets = {split: config.split_folder(role, split) for split in SPLITS}
    if not spec.generated:
        for folder in targets.values():
            check_imagefolder(folder)
        return targets
    train = resolve_prompts(spec.prompts, spec.prompt_file, f"data.{role}")
    test = resolve_prompts(spec.test_prompts, spec.test_prompt_file, f"data.{role} test") if spec.has_test_prompts else None
    seed = config.seed_for(role)
    items = split_items(train, test, spec.images_per_prompt, spec.test_fraction, seed)
    return _write_splits(
        backbone, items, seed, config.sampler_for(role), targets, overwrite, progress, f"generating {role}"
    )


def generate_data(
    backbone: Backbone,
    config: DataConfig,
    roles: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[tuple[str, str], Path]:
    """All ``(role, split)`` image folders of ``config`` (generated where needed)."""
    folders = {}
    for role in roles or config.roles():
        for split, folder in generate_role(backbone, config, role, overwrite=overwrite, progress=progress).items():
            folders[(role, split)] = folder
    return folders
