"""``metaunlearn toy ...``: pretrain, evaluate and look at the embedded concept world."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from metaunlearn.atomic import ensure_dir, replace_directory, usual_mode
from metaunlearn.errors import UserError
from metaunlearn.progress import progress_bar

from .assets import ASSET_DIR, DETECTOR_FILE, EVAL_FILE, MODEL_SUBDIR, detector_path, model_dir
from .defaults import DEFAULT_GUIDANCE, DEFAULT_PRETRAIN_OUT, DEFAULT_STEPS, PRETRAIN_STEPS, PRETRAIN_THREADS
from .taxonomy import CLASS_NAMES, CONCEPTS

if TYPE_CHECKING:
    from rich.progress import Progress

# torch, numpy, PIL and the training code are imported inside the commands, so ``--help`` stays fast.

app = typer.Typer(help="The embedded concept world: pretrain its detector and tiny diffusion model, evaluate, render.")
console = Console()
LOG_EVERY = 100
SAMPLES_FILE = "samples.png"  # one row of model samples per evaluation prompt


def _tracked(progress: Progress, description: str, total: int):
    task = progress.add_task(description, total=total, info="")
    start = time.perf_counter()

    def on_step(step: int, steps: int, loss: float) -> None:
        progress.update(task, completed=step, info=f"loss {loss:.4f}")
        if step % LOG_EVERY == 0 or step == steps:
            rate = step / (time.perf_counter() - start)
            progress.console.log(f"{description}: step {step}/{steps} loss {loss:.4f} {rate:.2f} it/s")

    return on_step


def _print_eval(rows: list[dict[str, object]], title: str) -> None:
    table = Table(title=title)
    for col in ("concept", "role", "prompt", "accuracy", "most confused with"):
        table.add_column(col)
    for row in rows:
        acc = float(row["accuracy"])
        style = "green" if acc >= 0.85 else "red"
        table.add_row(str(row["concept"]), str(row["role"]), str(row["prompt"]),
                      f"[{style}]{acc:.3f}[/]", str(row["most_confused_with"] or "-"))
    console.print(table)


def _check_assets(assets: Path, detector: bool = True) -> None:
    """A one-line error unless ``assets`` holds the toy model (and the detector)."""
    if not model_dir(assets).is_dir():
        raise UserError(f"toy model not found: {model_dir(assets)} (the asset folder needs model/ and "
                        f"{DETECTOR_FILE}; 'metaunlearn toy pretrain --out {assets}' builds them)")
    if detector and not detector_path(assets).is_file():
        raise UserError(f"toy detector not found: {detector_path(assets)}")


def _check_out(out: Path, overwrite_shipped: bool) -> None:
    """Refuse (one line) an ``--out`` that would replace the shipped assets or a folder that holds none."""
    shipped, out = ASSET_DIR.resolve(), out.resolve()
    if out in shipped.parents:
        raise UserError(f"--out {out} holds the shipped toy assets ({shipped}); give a folder of its own")
    if (out == shipped or shipped in out.parents) and not overwrite_shipped:
        raise UserError(f"--out {out} is in the shipped toy assets ({shipped}); pass --overwrite-shipped to replace "
                        "them, or give another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not ((out / EVAL_FILE).is_file() or model_dir(out).is_dir()):
        raise UserError(f"--out {out} holds other files (no toy assets), which writing would replace; give a new "
                        "or empty folder")


def _replace_dir(built: Path, out: Path) -> None:
    """Move ``built`` into place at ``out`` (old contents removed only after the new ones are there)."""
    for path in [built, *built.rglob("*")]:  # mkdtemp and some writers create owner-only files
        path.chmod(usual_mode(path.is_dir()))
    ensure_dir(out.parent)
    replace_directory(built, out)


@app.command()
def pretrain(
    out: Path = typer.Option(Path(DEFAULT_PRETRAIN_OUT), help="Asset directory to write (model/, detector.*, "
                             "eval.json); the shipped assets only with --overwrite-shipped."),
    overwrite_shipped: bool = typer.Option(False, "--overwrite-shipped", help="Allow --out to be the shipped asset "
                                           "folder or a folder in it (e.g. the retrain reference)."),
    seed: int = typer.Option(0, help="Seed for data, initialisation and sampling."),
    steps: int = typer.Option(PRETRAIN_STEPS, help="Diffusion model training steps."),
    detector_steps: int = typer.Option(1500, help="Detector training steps."),
    eval_samples: int = typer.Option(32, help="Samples per prompt in the final evaluation."),
    threads: int = typer.Option(PRETRAIN_THREADS, help="torch threads: the weights depend on it (the shipped "
                                "assets: 1)."),
    exclude: list[str] = typer.Option(
        [], help="A concept (e.g. red_triangle) whose images the model never sees: the retrain-from-scratch "
                 "reference an unlearned model is compared with. Repeatable."),
) -> None:
    """Train the detector and the toy text-to-image model, evaluate them, write the assets atomically.

    Writes model/ (diffusers folder), detector.safetensors + detector.json, eval.json (the per-prompt table,
    detector accuracy and wall times) and samples.png under --out. The defaults are the shipped assets' recipe.
    """
    _check_out(out, overwrite_shipped)
    import torch
    from PIL import Image

    from .detector import detector_accuracy, train_detector
    from .pretrain import (
        ToyModelConfig,
        concept_indices,
        config_dict,
        evaluate_model,
        evaluation_prompts,
        load_model,
        sample_grid,
        save_model,
        train_model,
    )

    concept_indices(exclude)  # an unknown name fails here, before any training
    torch.set_num_threads(max(1, threads))
    torch.manual_seed(seed)
    config = ToyModelConfig(steps=steps, exclude=tuple(sorted(set(exclude))))
    out = out.resolve()
    ensure_dir(out.parent)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        with progress_bar("step", console=console) as progress:
            start = time.perf_counter()
            detector = train_detector(steps=detector_steps, seed=seed,
                                      on_step=_tracked(progress, "detector", detector_steps))
            detector_seconds = time.perf_counter() - start
            detector.save(build / DETECTOR_FILE)
            start = time.perf_counter()
            pipe = train_model(config, seed=seed, on_step=_tracked(progress, "diffusion model", steps))
            model_seconds = time.perf_counter() - start
        save_model(pipe, build / MODEL_SUBDIR)
        console.log("evaluating the detector and the model")
        clean = detector_accuracy(detector, per_class=100, seed=seed + 1000)
        degraded = detector_accuracy(detector, per_class=100, seed=seed + 1000, degraded=True)
        reloaded = load_model(build / MODEL_SUBDIR)
        rows = evaluate_model(reloaded, detector, n=eval_samples, seed=seed + 2000)
        prompts = [prompt for _, prompt in evaluation_prompts()]
        Image.fromarray(sample_grid(reloaded, prompts, seed=seed + 3000)).save(build / SAMPLES_FILE)
        report = {
            "command": f"metaunlearn toy pretrain --seed {seed} --steps {steps} --detector-steps {detector_steps}"
                       f" --threads {threads}" + "".join(f" --exclude {name}" for name in config.exclude),
            "seed": seed,
            "torch_threads": torch.get_num_threads(),
            "pretrain_seconds": {"detector": round(detector_seconds, 1), "model": round(model_seconds, 1)},
            "sampler": {"scheduler": "DDIM", "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE},
            "model_config": config_dict(config),
            "detector_accuracy_clean": clean,
            "detector_accuracy_degraded": degraded,
            "model_sample_accuracy": rows,
        }
        (build / EVAL_FILE).write_text(json.dumps(report, indent=2) + "\n")
        _replace_dir(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _print_eval(rows, f"samples classified as their concept (n={eval_samples} per prompt)")
    console.print(f"wrote {out}  (detector {detector_seconds:.0f} s, model {model_seconds:.0f} s)")


@app.command()
def evaluate(
    assets: Path = typer.Option(ASSET_DIR, help="Asset directory holding model/ and detector.safetensors."),
    n: int = typer.Option(32, help="Samples per prompt."),
    seed: int = typer.Option(0, help="Sampling seed."),
    steps: int = typer.Option(DEFAULT_STEPS, help="DDIM steps."),
    guidance: float = typer.Option(DEFAULT_GUIDANCE, help="Classifier-free guidance scale."),
    threads: int = typer.Option(2, help="torch threads (1 is faster when other jobs share the 2 cores)."),
) -> None:
    """Print per-prompt detector accuracy of model samples, and the detector's accuracy on fresh renders."""
    _check_assets(assets)
    import torch

    from .detector import ConceptDetector, detector_accuracy
    from .pretrain import evaluate_model, load_model

    torch.set_num_threads(max(1, threads))
    detector = ConceptDetector.load(detector_path(assets))
    acc = detector_accuracy(detector, per_class=50, seed=seed + 7)
    console.print(f"detector accuracy on fresh renders: min {min(acc.values()):.3f} over {len(acc)} classes")
    rows = evaluate_model(load_model(model_dir(assets)), detector, n=n, seed=seed, steps=steps, guidance=guidance)
    _print_eval(rows, f"samples classified as their concept (n={n}, DDIM {steps} steps, guidance {guidance})")


@app.command("render")
def render_command(
    concept: str = typer.Argument(..., help=f"Concept or class name ({', '.join(c.name for c in CONCEPTS)}, ...),"
                                       " or a prompt with --model."),
    out: Path = typer.Option(Path("toy_samples"), help="Directory for the PNGs."),
    n: int = typer.Option(8, help="Number of images."),
    seed: int = typer.Option(0, help="Seed."),
    model: bool = typer.Option(False, help="Sample the toy model instead of the procedural renderer."),
    assets: Path = typer.Option(ASSET_DIR, help="Asset directory (with --model)."),
    scale: int = typer.Option(8, help="Upscaling factor of the written PNGs."),
) -> None:
    """Write PNGs of a concept: procedural renders, or samples of the toy model (--model: a prompt or a name)."""
    import numpy as np
    from PIL import Image

    from .pretrain import load_model, sample
    from .world import render_class

    if not model and concept not in CLASS_NAMES:
        raise UserError(f"unknown concept {concept!r} (known: {', '.join(CLASS_NAMES)}; or a prompt with --model)")
    if model:
        _check_assets(assets, detector=False)
        prompt = next((c.prompt for c in CONCEPTS if c.name == concept), concept)
        images = (sample(load_model(model_dir(assets)), prompt, n, seed=seed).permute(0, 2, 3, 1).numpy() * 255)
        images = np.rint(images).astype(np.uint8)
    else:
        images = render_class(concept, n, seed)
    ensure_dir(out)
    stem = concept.replace(" ", "_")
    for i, image in enumerate(images):
        size = (image.shape[1] * scale, image.shape[0] * scale)
        Image.fromarray(image).resize(size, Image.NEAREST).save(out / f"{stem}_{i:03d}.png")
    grid = np.concatenate(list(images), axis=1)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(
        out / f"{stem}_grid.png")
    console.print(f"wrote {len(images)} images of {concept!r} to {out}")


if __name__ == "__main__":
    app()
