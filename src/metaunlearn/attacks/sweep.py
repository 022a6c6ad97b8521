"""Sweeps of relearning attacks (attack sets × modes × learning rates × seeds), their result rows and aggregates.

Run-dir layout written here (and read by :mod:`metaunlearn.experiment.report`)::

    RUN_DIR/
      attacks/<model>/<attack_set>/<mode>_lr<lr>_s<seed>.jsonl    one JSON row per snapshot step
      grids/<model>/<attack_set>/<mode>_lr<lr>_s<seed>/step<k>.png sample grid of the eval grid set at step k

A row is ``{model, method, variant, attack_set, mode, lr, seed, step, grid, model_path, model_fingerprint,
eval_setting, diverged, diverged_step, <metric>: value, …}`` where ``eval_setting`` is the hash of the
evaluation's settings (:func:`~metaunlearn.attacks.step_zero.evaluation_setting`; an attack judged on its own
trigger prompts keeps its evaluation's), ``grid``
is the grid PNG's path relative to RUN_DIR (or null) and the metrics are those of
:mod:`metaunlearn.metrics.evaluate` plus ``attack_loss``. A run diverges at the first step whose training loss,
weights or probe loss are non-finite (:func:`~metaunlearn.attacks.finetune.run_attack`) or whose evaluation drew a
non-finite sample (``nonfinite_rate`` > 0); every row of the run names that step (``diverged_step``, else null),
and the rows at or after it have ``diverged: true`` and no metric, so they never count as relearning and drop out
of means, standard deviations and worst cases. A run's file is written atomically when the run
finishes, so an existing file means a complete run: a repeated sweep skips it (resume).

Aggregation over seeds gives mean, sample standard deviation (ddof=1; 0 for one seed), min, max and count per
snapshot step; the worst case takes the maximum of a metric over every mode × lr × seed of the sweep and names the
run that reached it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from metaunlearn.atomic import atomic_write_bytes, atomic_write_text
from metaunlearn.attacks.finetune import run_attack
from metaunlearn.attacks.run_spec import AttackSpec
from metaunlearn.attacks.step_zero import StepZeroEvaluations, evaluation_setting
from metaunlearn.attacks.suite_config import AttackSuiteConfig
from metaunlearn.backbones.base import Backbone
from metaunlearn.data.cache import CachedSet
from metaunlearn.errors import UserError
from metaunlearn.images import image_grid, pixelate, save_png

ATTACKS_DIR = "attacks"
GRIDS_DIR = "grids"
STEP_ZERO_DIR = "step0-eval"
KEY_FIELDS = ("model", "method", "variant", "attack_set", "mode", "lr", "seed", "step")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class ModelInfo:
    """How a model appears in results: its name, base method, variant (base / plain / meta) and identity (resolved
    folder and content fingerprint, see :mod:`metaunlearn.identity`; empty for a model only in memory)."""

    name: str
    method: str
    variant: str
    path: str | None = None
    fingerprint: str | None = None


def check_name(name: str, what: str) -> str:
    """A name used as a folder: letters, digits, ``._+-``."""
    if not NAME_PATTERN.match(name):
        raise UserError(f"{what} {name!r} must be letters, digits, '.', '_', '+' or '-' (it names a folder)")
    return name


def run_file(run_dir: Path, model: str, attack_set: str, spec: AttackSpec) -> Path:
    return Path(run_dir) / ATTACKS_DIR / model / attack_set / f"{spec.run_name}.jsonl"


def grid_file(run_dir: Path, model: str, attack_set: str, spec: AttackSpec, step: int) -> Path:
    return Path(run_dir) / GRIDS_DIR / model / attack_set / spec.run_name / f"step{step}.png"


def write_jsonl(rows: Sequence[Mapping], path: Path) -> Path:
    """Write rows as JSON lines atomically (NaN/inf as null)."""
    return atomic_write_text(path, "".join(json.dumps(_json_safe(row)) + "\n" for row in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run_rows(run_dir: Path, model: str, attack_set: str, specs: Iterable[AttackSpec]) -> list[dict]:
    """The rows of finished runs (their files), in spec order."""
    rows = []
    for spec in specs:
        path = run_file(run_dir, model, attack_set, spec)
        if path.is_file():
            rows += _read_jsonl(path)
    return rows


def _json_safe(row: Mapping) -> dict:
    """NaN/inf (e.g. a diverged attack) as null, so every file is strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def read_rows(run_dir: str | Path) -> list[dict]:
    """Every result row under ``RUN_DIR/attacks`` (a one-line :class:`UserError` on a malformed file)."""
    root = Path(run_dir) / ATTACKS_DIR
    if not root.is_dir():
        raise UserError(f"{run_dir} has no '{ATTACKS_DIR}' folder of attack results")
    rows = []
    for path in sorted(root.glob("*/*/*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            missing = [k for k in KEY_FIELDS if k not in row]
            if not isinstance(row, dict) or missing:
                raise UserError(f"{path}:{n}: result row lacks {', '.join(missing) or 'an object'}")
            rows.append(row)
    if not rows:
        raise UserError(f"no result rows under {root}")
    return rows


def _save_grid(images: torch.Tensor, path: Path, pixelated: bool) -> None:
    if pixelated:
        images = pixelate(images)
    save_png(image_grid(images, ncol=min(len(images), 4)), path)


def check_budget(suite: AttackSuiteConfig, evaluator) -> None:
    """The suite's ``snapshot_samples`` may only lower the evaluation's samples per prompt."""
    if evaluator is None:
        return
    full = evaluator.config.samples_per_prompt
    over = sorted(step for step, k in suite.snapshot_samples.items() if k > full)
    if over:
        raise UserError(f"attack.snapshot_samples asks for more samples per prompt than eval.samples_per_prompt "
                        f"({full}) at steps {over}: it can only lower the evaluation budget")


def run_sweep(
    backbone: Backbone,
    sets: Mapping[str, CachedSet],
    suite: AttackSuiteConfig,
    run_dir: str | Path,
    model: ModelInfo,
    evaluator=None,
    *,
    progress: bool = True,
    resume: bool = True,
    cache_dir: str | Path | None = None,
    only: Sequence[str] | None = None,
    shard=None,
    autocast=None,
    step_zero: StepZeroEvaluations | None = None,
) -> list[dict]:
    """Attack ``backbone`` with every spec of ``suite`` on every set; write and return the result rows.

    ``evaluator`` is a :class:`metaunlearn.metrics.evaluate.Evaluator` (or ``None``: only ``attack_loss``). The
    step-0 evaluation (the unattacked model) is computed once per model and evaluation setting and shared by every
    run that evaluates the same prompts (an attack with its own trigger prompt, e.g. textual inversion, evaluates
    its own step 0): ``step_zero`` holds them across calls (default: for this call, and on disk under
    ``cache_dir/step0-eval`` when the model has a fingerprint; :mod:`metaunlearn.attacks.step_zero`). Snapshot
    steps in the suite's ``snapshot_samples`` are evaluated on that many samples per prompt.
    ``sets`` also holds the sets sequential attacks train on first; ``only`` limits which sets are attacked.
    ``cache_dir`` keeps DreamBooth class images. Under a
    data-parallel launch (``shard``, see :func:`~metaunlearn.attacks.finetune.run_attack`) every process trains,
    the main process alone evaluates and writes; the other processes return no rows.
    """
    from contextlib import nullcontext

    from metaunlearn.training.parallel import SINGLE

    shard = shard or SINGLE
    main = shard.rank == 0
    run_dir = Path(run_dir)
    check_name(model.name, "model name")
    rows: list[dict] = []
    if step_zero is None:
        step_zero = StepZeroEvaluations(model.fingerprint, Path(cache_dir) / STEP_ZERO_DIR if cache_dir else None)
    check_budget(suite, evaluator)
    setting = evaluation_setting(evaluator)
    for set_name, data in sets.items():
        if only is not None and set_name not in only:
            continue
        check_name(set_name, "attack set name")
        for spec in suite.specs(set_name):
            check_name(spec.kind, "attack kind")
            path = run_file(run_dir, model.name, set_name, spec)
            if resume and path.is_file():
                done = _read_jsonl(path)
                if sorted(r["step"] for r in done) == spec.snapshot_steps:
                    rows.extend(done)
                    continue
            # grids of an interrupted attempt: this run's PNGs must all come from the run about to happen
            shutil.rmtree(grid_file(run_dir, model.name, set_name, spec, 0).parent, ignore_errors=True)

            judge = evaluator
            if evaluator is not None and spec.eval_prompts:
                judge = evaluator.with_forget_prompts(spec.eval_prompts)

            def evaluate(bb: Backbone, step: int, _set=set_name, _spec=spec, evaluator=judge):
                if evaluator is None:
                    return {}
                grid = grid_file(run_dir, model.name, _set, _spec, step)
                key = None
                if step == 0:
                    ti = _spec.textual_inversion.model_dump(mode="json") if _spec.mode == "textual_inversion" else None
                    quantize = _spec.quantize.model_dump(mode="json") if _spec.quantize is not None else None
                    key = step_zero.key(bb, evaluator, textual_inversion=ti, quantize=quantize,
                                        grid_images=suite.grid_images)
                    shared = step_zero.get(key)
                    if shared is not None:
                        metrics, png = shared
                        if png is not None:
                            atomic_write_bytes(grid, png)
                        return dict(metrics)
                outcome = evaluator.evaluate(bb, _spec.snapshot_samples.get(step))
                images = outcome.images.get(evaluator.grid_set)
                if suite.grid_images and images is not None and len(images):
                    _save_grid(images[: suite.grid_images], grid, evaluator.config.grid_pixelate)
                if key is not None:
                    step_zero.put(key, outcome.metrics, grid.read_bytes() if grid.is_file() else None)
                return outcome.metrics

            result = run_attack(
                backbone, data, spec, evaluate, sets=sets, cache_dir=cache_dir, progress=progress,
                description=f"{model.name} {set_name} {spec.run_name}", shard=shard, autocast=autocast or nullcontext,
            )
            if not main:
                continue
            run_rows = []
            diverged = diverged_step(result)
            for snap in result.snapshots:
                grid = grid_file(run_dir, model.name, set_name, spec, snap.step)
                lost = diverged is not None and snap.step >= diverged
                run_rows.append({
                    "model": model.name,
                    "method": model.method,
                    "variant": model.variant,
                    "attack_set": set_name,
                    "mode": spec.kind,
                    "lr": spec.lr,
                    "lr_multiple": spec.lr_multiple,
                    "seed": spec.seed,
                    "step": snap.step,
                    "grid": str(grid.relative_to(run_dir)) if grid.is_file() else None,
                    "model_path": model.path,
                    "model_fingerprint": model.fingerprint,
                    "eval_setting": setting,
                    "diverged": lost,
                    "diverged_step": diverged,
                    **({} if lost else snap.metrics),
                })
            write_jsonl(run_rows, path)
            rows.extend(run_rows)
    return rows


def diverged_step(result) -> int | None:
    """The step a run diverged at: its training's, or the first snapshot with a non-finite sample if earlier."""
    step = result.diverged_step
    for snap in result.snapshots:
        if (step is None or snap.step < step) and snap.metrics.get("nonfinite_rate", 0.0) > 0:
            return snap.step
    return step


# ---- aggregation ------------------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _value(row: Mapping, metric: str) -> float | None:
    v = row.get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


def aggregate(
    rows: Iterable[Mapping],
    metric: str = "forget_rate",
    by: Sequence[str] = ("model", "method", "variant", "attack_set", "mode", "lr", "step"),
) -> list[dict]:
    """Per group of ``by``: ``mean``, ``std`` (ddof=1), ``min``, ``max``, ``n`` of ``metric`` over the rest (seeds)."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        value = _value(row, metric)
        if value is not None:
            groups.setdefault(tuple(row[k] for k in by), []).append(value)
    out = []
    for key, values in groups.items():
        mean, std = _mean_std(values)
        out.append({**dict(zip(by, key)), "metric": metric, "mean": mean, "std": std,
                    "min": min(values), "max": max(values), "n": len(values)})
    return sorted(out, key=lambda r: tuple(str(r[k]) if not isinstance(r[k], (int, float)) else r[k] for k in by))


def worst_case(
    rows: Iterable[Mapping],
    metric: str = "forget_rate",
    by: Sequence[str] = ("model", "method", "variant", "attack_set", "step"),
) -> list[dict]:
    """Per group of ``by``: the maximum of ``metric`` over every other field (mode × lr × seed) and where it was."""
    best: dict[tuple, dict] = {}
    for row in rows:
        value = _value(row, metric)
        if value is None:
            continue
        key = tuple(row[k] for k in by)
        if key not in best or value > best[key]["worst"]:
            best[key] = {**dict(zip(by, key)), "metric": metric, "worst": value,
                         "at": {k: row[k] for k in ("mode", "lr", "seed") if k in row and k not in by}}
    return sorted(best.values(), key=lambda r: tuple(str(r[k]) if not isinstance(r[k], (int, float)) else r[k] for k in by))
