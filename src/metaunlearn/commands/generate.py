"""``metaunlearn generate``: sample concept data sets from a model (one folder, or every folder a config names)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import typer
from pydantic import Field
from rich.console import Console
from rich.table import Table

from metaunlearn.config import StrictModel, read_sections, validate
from metaunlearn.data.config import DataConfig, SamplerSettings
from metaunlearn.devices import DTYPES, resolve_device, resolve_dtype  # noqa: F401 (used by other commands)
from metaunlearn.errors import UserError


class GenerateFile(StrictModel):
    """The parts of a config file ``generate --config`` reads: ``model`` and ``data`` (other sections belong to
    other commands and are validated by them)."""

    model_config = {**StrictModel.model_config, "extra": "ignore"}

    model: Optional[str] = Field(None, description="base model folder (relative to the config file)")
    data: DataConfig


def _load(model: Path, device: str, dtype: str):
    from metaunlearn.backbones.loading import load_backbone

    dev = resolve_device(device)
    return load_backbone(model, device=dev, dtype=resolve_dtype(dtype, dev))


def _summary(rows: list[tuple[str, Path, int, str]], console: Console) -> None:
    table = Table(title="data sets")
    for column in ("set", "folder", "images", "cache"):
        table.add_column(column, overflow="fold")
    for name, folder, n, cache in rows:
        table.add_row(name, str(folder), str(n), cache)
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        model_dir: Optional[Path] = typer.Argument(
            None, help="Diffusers model folder to sample from (SD-1.x/2.x, SDXL or the toy model). "
            "With --config it overrides the config's 'model'."
        ),
        prompt: Optional[list[str]] = typer.Option(
            None, "--prompt", "-p", help="A prompt, taken verbatim (repeatable; use this for prompts with commas)."
        ),
        prompts: Optional[str] = typer.Option(None, "--prompts", help="Comma-separated prompts, e.g. \"a dog,a cat\"."),
        prompt_file: Optional[Path] = typer.Option(
            None, "--prompt-file", help="Prompt file: .txt (one per line), .csv with a 'prompt' column, or .yaml list."
        ),
        out: Optional[Path] = typer.Option(
            None, "--out", "-o", help="Output image folder (with --config: the data root, overriding data.root; default there: data.root "
            "relative to the config file, else the config's run folder's data/)."
        ),
        images_per_prompt: int = typer.Option(1, "--images-per-prompt", "-n", min=1, help="Images per prompt."),
        seed: int = typer.Option(0, "--seed", help="Seed of the first image; image i uses seed+i."),
        steps: int = typer.Option(25, "--steps", min=1, help="DDIM sampling steps."),
        guidance: float = typer.Option(7.5, "--guidance", min=0.0, help="Classifier-free guidance scale."),
        negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt for every image."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per pipeline call."),
        resolution: Optional[int] = typer.Option(
            None, "--resolution", min=8, help="Image side in pixels (default: the model's native resolution)."
        ),
        config: Optional[Path] = typer.Option(
            None, "--config", "-c", help="YAML config: generate every role/split folder its 'data' section names."
        ),
        role: Optional[list[str]] = typer.Option(
            None, "--role", help="With --config: only this role (forget, related, irrelevant); repeatable."
        ),
        cache: bool = typer.Option(
            False, "--cache", help="Also precompute the latent/conditioning cache of every folder written."
        ),
        cache_dir: Optional[Path] = typer.Option(
            None, "--cache-dir", help="Cache folder (default: data.cache_dir, or 'cache' beside the output)."
        ),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace existing folders generated with other settings."
        ),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        dtype: str = typer.Option("auto", "--dtype", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
        wait: bool = typer.Option(
            False, "--wait", help="Wait for another metaunlearn process writing the same folder (default: refuse)."
        ),
    ) -> None:
        """Sample concept images with captions from a model and write them as image folders (metadata.jsonl)."""
        from metaunlearn.locking import waiting_for_locks

        console = Console()
        if dtype != "auto" and dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r} (choose auto, {', '.join(DTYPES)})")
        inline = list(prompt or []) + (split_prompts(prompts) if prompts else [])
        if config is not None:
            if inline or prompt_file:
                raise UserError("give either --config or prompts (--prompt/--prompts/--prompt-file), not both")
            with waiting_for_locks(wait):
                _generate_from_config(
                    config, model_dir, out, role, cache, cache_dir, overwrite, device, dtype, not quiet, console
                )
            return
        if role:
            raise UserError("--role only applies with --config")
        if model_dir is None:
            raise UserError("give a model folder (or --config)")
        if out is None:
            raise UserError("give an output folder with --out")
        from metaunlearn.data.prompts import resolve_prompts

        if inline and prompt_file:
            raise UserError("give either --prompt/--prompts or --prompt-file, not both")
        texts = resolve_prompts(inline, prompt_file, "generate")
        sampler = SamplerSettings(
            steps=steps, guidance=guidance, negative_prompt=negative_prompt, batch_size=batch_size, resolution=resolution
        )
        from metaunlearn.atomic import ensure_dir
        from metaunlearn.data.generate import generate_folder
        from metaunlearn.locking import folder_lock

        ensure_dir(out.parent)
        backbone = _load(model_dir, device, dtype)
        with folder_lock(out, "data folder", wait=wait):
            folder = generate_folder(
                backbone, texts, out, images_per_prompt=images_per_prompt, seed=seed, sampler=sampler,
                overwrite=overwrite, progress=not quiet,
            )
            cache_note = ""
            if cache:
                from metaunlearn.data.caching import cached_set

                data = cached_set(backbone, folder, cache_dir or folder.parent / "cache", progress=not quiet)
                cache_note = f"{len(data)} encoded"
        _summary([("generated", folder, len(texts) * images_per_prompt, cache_note)], console)


def split_prompts(value: str) -> list[str]:
    from metaunlearn.data.prompts import split_prompt_list

    return split_prompt_list(value)


def load_generate_file(path: Path) -> GenerateFile:
    """Read a config's ``model`` and ``data`` sections, with relative paths taken from the config's folder."""
    from metaunlearn.config import default_run_dir, resolve_path

    raw = read_sections(path)
    parsed = validate(GenerateFile, raw, str(path))
    run_dir = raw.get("run_dir") if isinstance(raw.get("run_dir"), str) else None
    data = parsed.data.resolve_paths(path.resolve().parent, default_run_dir(path, run_dir) / "data")
    model = str(resolve_path(parsed.model, path.resolve().parent)) if parsed.model is not None else None
    return GenerateFile(model=model, data=data)


def _generate_from_config(
    config: Path,
    model_dir: Path | None,
    out: Path | None,
    roles: list[str] | None,
    cache: bool,
    cache_dir: Path | None,
    overwrite: bool,
    device: str,
    dtype: str,
    progress: bool,
    console: Console,
) -> None:
    from metaunlearn.data.config import ROLES
    from metaunlearn.locking import folder_lock

    parsed = load_generate_file(config)
    data = parsed.data
    if out is not None:
        data = data.model_copy(update={"root": out})
    for r in roles or []:
        if r not in ROLES:
            raise UserError(f"unknown role {r!r} (choose {', '.join(ROLES)})")
    selected = list(roles) if roles else data.roles()
    for r in selected:
        data.role(r)
    model = model_dir if model_dir is not None else (Path(parsed.model) if parsed.model else None)
    needs_model = cache or any(data.role(r).generated for r in selected)
    if needs_model and model is None:
        raise UserError(f"{config}: no model given (set 'model' in the config or pass a model folder)")
    backbone = _load(model, device, dtype) if needs_model else None
    with ExitStack() as locks:
        if data.root is not None:  # one process at a time writes the data root
            locks.enter_context(folder_lock(data.root, "data folder"))
        rows = _generate_roles(backbone, data, selected, cache, cache_dir, overwrite, progress)
    _summary(rows, console)


def _generate_roles(backbone, data, selected, cache, cache_dir, overwrite, progress) -> list:
    from metaunlearn.data.generate import generate_role
    from metaunlearn.data.imagefolder import read_metadata

    rows = []
    for r in selected:
        folders = generate_role(backbone, data, r, overwrite=overwrite, progress=progress)
        for split, folder in folders.items():
            note = ""
            if cache:
                from metaunlearn.data.caching import cached_set

                encoded = cached_set(backbone, folder, cache_dir or data.cache_path, progress=progress)
                note = f"{len(encoded)} encoded"
            rows.append((f"{r}/{split}", folder, len(read_metadata(folder)), note))
    return rows
