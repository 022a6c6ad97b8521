"""What ``unlearn --dry-run`` prints: the stage's plan and the meta step's predicted peak memory; nothing is built."""

from __future__ import annotations

from pathlib import Path

import torch

from metaunlearn.formatting import format_lr
from metaunlearn.unlearn import MODEL_DIR
from metaunlearn.unlearn_config import UnlearnConfig
from metaunlearn.unlearn_data import meta_roles


def memory_plan(config: UnlearnConfig, model: Path | None = None):
    """The meta step's :class:`~metaunlearn.meta.memory.MemoryPlan` for ``config`` (None without a meta objective).

    ``model``: a folder with the same architecture to read shapes from (default: ``config.model``). On CPU the
    plan includes this process's resident memory (the Python/torch runtime); on a GPU it counts tensors only.
    """
    from metaunlearn.meta.memory import plan_for_model_folder, process_rss

    if config.meta is None:
        return None
    method = config.method.build()
    subset = config.meta.trainable or config.trainable or method.trainable_subset
    folder = Path(model or config.model)
    if not (folder / "unet" / "config.json").exists():
        return None
    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    return plan_for_model_folder(folder, config.meta, subset, mixed_precision=config.mixed_precision,
                                 gradient_checkpointing=config.gradient_checkpointing, outer_optimizer=config.optimizer,
                                 runtime_bytes=process_rss() if on_cpu else 0, base_loss=method.kind == "loss")


def describe(config: UnlearnConfig, device_memory: float | None = None) -> list[str]:
    """Human-readable plan lines (for ``--dry-run``), with the meta step's memory plan (and whether it fits
    ``device_memory`` GiB)."""
    method = config.method.build()
    lines = [f"model: {config.model}", f"method: {method.describe()}"]
    subset = config.trainable or method.trainable_subset
    if method.kind == "edit":
        lines.append("closed-form edit of cross-attention K/V")
    if method.kind == "loss" or config.meta is not None:
        lr = config.lr or method.default_lr
        lines.append(f"train: {config.steps} steps, AdamW lr {format_lr(lr)}, subset {subset}, seed {config.seed}")
        if config.meta is not None and config.meta.trainable and config.meta.trainable != subset:
            lines.append(f"meta terms train subset {config.meta.trainable} (the base loss only {subset})")
    if config.meta is not None:
        m = config.meta
        lines.append(
            f"meta ({m.order} order): γ_ir {m.gamma_irrelevant:g} γ_rel {m.gamma_related:g} β_f {m.beta_forget:g} "
            f"β_rel {m.beta_related:g} β_ir {m.beta_irrelevant:g}; attacks "
            + ", ".join(
                f"{a.trainable}/{a.optimizer}"
                + (f" radius {a.radius:g}" if a.radius else
                   f" lr {format_lr(a.lr_range[0])}-{format_lr(a.lr_range[1])}" if a.lr_range else
                   f" lr {format_lr(a.lr)}")
                + (f" {a.steps_range[0]}-{a.steps_range[1]} steps" if a.steps_range else
                   f" {a.steps} steps" if a.steps else f" {a.epochs} epoch(s)")
                + (f" on {a.data}" if a.data != "forget_train" else "")
                for a in m.attacks
            )
            + (f"; ascent along the trajectory (every {m.trajectory_stride})" if m.ascent_along == "trajectory" else "")
            + (f"; ascent bound {m.bound_description()}" if m.ascent_bound != "none" else "")
            + (f"; forget term anchored to the {m.anchor_to} model" if m.forget_term == "anchor" else "")
        )
        for meta_role, (role, split) in meta_roles(m).items():
            split = split or config.data.benign_split
            paths = getattr(config.data, role)
            lines.append(f"data {meta_role}: {getattr(paths, split) if paths else 'MISSING'}")
        for name in sorted({a.data for a in m.attacks} - {"forget_train"}):
            lines.append(f"data attack set {name}: {config.data.attack_sets.get(name, 'MISSING')}")
        plan = memory_plan(config)
        if plan is None:
            lines.append(f"meta step memory plan: no model folder at {config.model}")
        else:
            lines += plan.lines(device_memory)
    lines.append(f"out: {config.out}/{MODEL_DIR}")
    return lines
