"""The unlearning stage: load a backbone and cached data, run a base method with or without the meta objective, save.

Flow (one straight line)::

    load_backbone(model)                                  original weights (ESD's teacher, UCE's W_old come from here)
    method.apply(...)                                     ESD/SDD: a per-step loss; UCE/RECE: closed-form edit now
    [meta]  cached_set(...) for forget/related/irrelevant latents + conditioning, encoded once
    TrainLoop(out).run(step_fn)                           outer steps: plain base loss, or MetaObjective
    backbone.save(out/model)                              a plain diffusers folder (LoRA attack adapters removed)

Data parallel with no change to the config: ``torchrun --nproc_per_node N -m metaunlearn unlearn CONFIG`` or
``accelerate launch -m metaunlearn unlearn CONFIG`` (``--mixed_precision bf16`` and the environment variable
``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` are taken from the launcher unless the config sets them). Every process draws the same batches and computes its share
of each (:mod:`metaunlearn.training.parallel`), so the trained weights equal a one-process run's at the same batch
sizes; the main process alone writes the outputs, and a checkpoint resumes under any number of processes.

Outputs in ``out``: ``model/`` (diffusers), ``config.json`` (resolved config), ``train_log.jsonl`` (loss terms per
step), ``checkpoint/`` (resume state), ``edit.json`` (closed-form edit statistics, UCE/RECE).

A config file is either this stage's config (:class:`UnlearnConfig`) at the top level, or a whole experiment file
with an ``unlearn:`` section; then ``model`` and ``data`` (a :class:`~metaunlearn.data.config.DataConfig`) may come
from the file's top level, and ``forget_prompts`` default to the forget data set's prompts.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from metaunlearn.backbones.base import TRAINABLE_SUBSETS, Backbone
from metaunlearn.config import StrictModel, read_yaml, validate
from metaunlearn.data.cache import CachedSet
from metaunlearn.data.caching import load_set
from metaunlearn.errors import UserError
from metaunlearn.experiment.formatting import format_lr
from metaunlearn.meta.config import MetaConfig
from metaunlearn.meta.objective import MetaObjective, PlainObjective, autocast_factory
from metaunlearn.meta.plan import MetaData
from metaunlearn.methods import Method, UnlearnInputs
from metaunlearn.methods.config import MethodSpec
from metaunlearn.runs import settings_key
from metaunlearn.training.durability import SIGNALS_FILE, DurabilityProbe, SignalsConfig, reference_weights

MODEL_DIR = "model"
CONFIG_FILE = "config.json"
EDIT_FILE = "edit.json"


class SplitPaths(StrictModel):
    """One role's splits: an image folder (encoded once and cached) or a cached ``.safetensors`` set each."""

    train: Path | None = None
    test: Path | None = None


class UnlearnData(StrictModel):
    """Data sets of the meta objective (plain ESD/SDD/UCE/RECE need none)."""

    forget: SplitPaths | None = Field(None, description="attack on train, β_f term on test")
    related: SplitPaths | None = None
    irrelevant: SplitPaths | None = None
    attack_sets: dict[str, Path] = Field(
        default_factory=dict,
        description="further forget sets a simulated attack may finetune on (meta.attacks[].data names one): "
                    "name -> image folder or cached set",
    )
    benign_split: Literal["train", "test"] = Field(
        "test", description="split of related/irrelevant used by the meta terms (the official code: test)"
    )
    cache_dir: Path | None = Field(None, description="latent cache folder (default: <out>/cache)")


class UnlearnConfig(StrictModel):
    """The ``unlearn`` stage."""

    model: Path = Field(..., description="diffusers model folder to unlearn from")
    out: Path | None = Field(None, description="output folder (default: runs/<config name>/<method>[-meta])")
    method: MethodSpec = Field(default_factory=MethodSpec)
    meta: MetaConfig | None = Field(None, description="the meta objective; null = plain unlearning")
    data: UnlearnData = Field(default_factory=UnlearnData)
    forget_prompts: list[str] = Field(..., min_length=1, description="the unlearning prompts")
    preserve_prompts: list[str] = Field(default_factory=list, description="prompts whose behaviour to keep")
    trainable: Literal[TRAINABLE_SUBSETS] | None = Field(  # type: ignore[valid-type]
        None, description="override of the method's trained UNet subset"
    )
    steps: int = Field(200, ge=1, description="outer optimizer steps (ESD/SDD, or the meta stage after UCE/RECE)")
    lr: float | None = Field(None, gt=0, description="outer AdamW learning rate (default: the method's, 1e-5)")
    weight_decay: float = Field(0.0, ge=0, description="outer AdamW weight decay")
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="outer optimizer; adamw8bit: bitsandbytes' 8-bit AdamW (pip install 'metaunlearn[bnb]'), "
                             "a quarter of AdamW's state memory"
    )
    clip_grad_norm: float | None = Field(None, gt=0, description="clip of plain-method gradients (meta: meta.clip)")
    seed: int = 0
    checkpoint_every: int = Field(50, ge=0)
    signals: SignalsConfig | None = Field(
        default_factory=SignalsConfig,
        description="durability signals in the training log and signals.json (needs data.forget; null: none)",
    )
    mixed_precision: Literal["no", "bf16"] | None = Field(
        None, description="bf16 autocast or no; null: the launcher's (accelerate launch --mixed_precision), else no"
    )
    gradient_accumulation_steps: int | None = Field(
        None, ge=1, description="micro-batches per batch (same update, less memory); null: ACCELERATE_GRADIENT_ACCUMULATION_STEPS, else 1"
    )
    gradient_checkpointing: bool = False
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")

    @model_validator(mode="after")
    def _consistent(self) -> UnlearnConfig:
        if self.meta is not None and self.meta.order == "second_unrolled" and self.gradient_checkpointing:
            raise ValueError("meta.order 'second_unrolled' cannot be combined with gradient_checkpointing")
        return self

    @property
    def variant(self) -> str:
        return f"{self.method.name}-meta" if self.meta is not None else f"{self.method.name}-plain"


# ---- config files ---------------------------------------------------------------------------------------------------
def _resolve_path(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path


def unlearn_section(raw: dict, base: Path, source: str, data_root: Path | None = None) -> dict:
    """The ``unlearn`` section completed from the experiment file's top-level ``model`` and ``data`` (an unset
    ``data.root`` is ``data_root``, the run folder's ``data/``)."""
    section = raw["unlearn"]
    if not isinstance(section, dict):
        raise UserError(f"{source}: 'unlearn' must be a mapping")
    section = dict(section)
    if "model" not in section and raw.get("model") is not None:
        section["model"] = raw["model"]
    top_data = raw.get("data")
    if isinstance(top_data, dict) and ("data" not in section or "forget_prompts" not in section):
        from metaunlearn.data.config import DataConfig
        from metaunlearn.data.prompts import resolve_prompts

        data_cfg = validate(DataConfig, top_data, f"{source} (data)").resolve_paths(base, data_root)
        if "data" not in section:
            section["data"] = {
                **{
                    role: {"train": str(data_cfg.split_folder(role, "train")), "test": str(data_cfg.split_folder(role, "test"))}
                    for role in data_cfg.roles()
                },
                "cache_dir": str(data_cfg.cache_path),
            }
        if "forget_prompts" not in section and data_cfg.forget is not None and data_cfg.forget.generated:
            section["forget_prompts"] = resolve_prompts(
                data_cfg.forget.prompts, data_cfg.forget.prompt_file, "data.forget prompts"
            )
    return section


def load_unlearn_config(path: Path, overrides: dict[str, Any] | None = None) -> UnlearnConfig:
    """Read an unlearn config (standalone, or an experiment file's ``unlearn`` section); paths relative to the file."""
    path = Path(path)
    from metaunlearn.config import default_run_dir

    raw = read_yaml(path)
    base = path.resolve().parent
    run_dir = default_run_dir(path, raw.get("run_dir") if isinstance(raw.get("run_dir"), str) else None)
    data = unlearn_section(raw, base, str(path), run_dir / "data") if "unlearn" in raw else dict(raw)
    overrides = dict(overrides or {})
    cli_out = overrides.pop("out", None)
    for key, value in overrides.items():
        if key == "method_name":
            spec = data.get("method") or {}
            if isinstance(spec, dict) and spec.get("name", "esd") != value:
                data["method"] = {"name": value}  # another method: its own defaults, not the old params
            elif isinstance(spec, dict):
                data["method"] = {**spec, "name": value}
        elif key == "meta":
            if value and not data.get("meta"):
                data["meta"] = {}
            elif not value:
                data["meta"] = None
        else:
            data[key] = value
    config = validate(UnlearnConfig, data, str(path))
    update: dict[str, Any] = {"model": _resolve_path(config.model, base)}
    # --out is relative to the working directory, the config's out to the config file, the default is runs/...
    if cli_out is not None:
        update["out"] = Path(cli_out)
    elif config.out is not None:
        update["out"] = _resolve_path(config.out, base)
    else:
        update["out"] = run_dir / config.variant
    splits = {}
    for role in ("forget", "related", "irrelevant"):
        s = getattr(config.data, role)
        if s is not None:
            splits[role] = SplitPaths(train=_resolve_path(s.train, base), test=_resolve_path(s.test, base))
    if config.signals is not None and config.signals.reference is not None:
        update["signals"] = config.signals.model_copy(update={"reference": _resolve_path(config.signals.reference, base)})
    cache = _resolve_path(config.data.cache_dir, base)
    attack_sets = {name: _resolve_path(p, base) for name, p in config.data.attack_sets.items()}
    update["data"] = config.data.model_copy(update={**splits, "cache_dir": cache, "attack_sets": attack_sets})
    return config.model_copy(update=update)


# ---- data --------------------------------------------------------------------------------------------------------------
def meta_roles(meta: MetaConfig) -> dict[str, tuple[str, str]]:
    """Meta data role -> (config role, split) for every set the weights need."""
    needed: dict[str, tuple[str, str]] = {}
    if meta.needs_attack:
        needed["forget_train"] = ("forget", "train")
    if meta.beta_forget > 0:
        needed["forget_test"] = ("forget", "test")
    if meta.gamma_related > 0 or meta.beta_related > 0:
        needed["related"] = ("related", "")
    if meta.gamma_irrelevant > 0 or meta.beta_irrelevant > 0:
        needed["irrelevant"] = ("irrelevant", "")
    return needed


def load_meta_data(backbone: Backbone, config: UnlearnConfig, progress: bool = True) -> MetaData:
    """Every data set the meta weights need, as cached sets on the backbone's device."""
    assert config.meta is not None
    cache_dir = config.data.cache_dir or (config.out / "cache")
    roles, extra = meta_data_paths(config)
    sets = {meta_role: load_set(backbone, path, cache_dir, label, progress) for meta_role, (label, path) in roles.items()}
    attack_sets = {name: load_set(backbone, path, cache_dir, label, progress) for name, (label, path) in extra.items()}
    return MetaData(**sets, attack_sets=attack_sets)


def meta_data_paths(config: UnlearnConfig) -> tuple[dict[str, tuple[str, Path]], dict[str, tuple[str, Path]]]:
    """(meta role -> (config key, path), extra attack set -> (config key, path)) of every set the meta weights
    need; a missing entry is a :class:`UserError`."""
    assert config.meta is not None
    roles: dict[str, tuple[str, Path]] = {}
    for meta_role, (role, split) in meta_roles(config.meta).items():
        split = split or config.data.benign_split
        paths = getattr(config.data, role)
        path = getattr(paths, split) if paths is not None else None
        if path is None:
            raise UserError(f"the meta objective needs data.{role}.{split} (a folder or a cached set)")
        roles[meta_role] = (f"data.{role}.{split}", Path(path))
    extra: dict[str, tuple[str, Path]] = {}
    for name in sorted({a.data for a in config.meta.attacks} - {"forget_train"}):
        if name not in config.data.attack_sets:
            raise UserError(f"meta.attacks names data '{name}', which is neither forget_train nor in data.attack_sets")
        extra[name] = (f"data.attack_sets.{name}", Path(config.data.attack_sets[name]))
    return roles, extra


def durability_probe(backbone: Backbone, config: UnlearnConfig, progress: bool = True) -> DurabilityProbe | None:
    """The signals probe of this stage (``None`` without ``signals`` or without forget data)."""
    signals, data = config.signals, config.data
    if signals is None or data.forget is None or (data.forget.train or data.forget.test) is None:
        return None
    cache_dir = data.cache_dir or (config.out / "cache")
    split = "train" if data.forget.train is not None else "test"
    forget = load_set(backbone, getattr(data.forget, split), cache_dir, f"data.forget.{split}", progress)
    related = None
    if data.related is not None and getattr(data.related, data.benign_split) is not None:
        path = getattr(data.related, data.benign_split)
        related = load_set(backbone, path, cache_dir, f"data.related.{data.benign_split}", progress)
    reference = reference_weights(signals.reference) if signals.reference is not None else None
    return DurabilityProbe(backbone, signals, forget.to(backbone.device), related and related.to(backbone.device),
                           reference)


# ---- the stage ---------------------------------------------------------------------------------------------------------
@dataclass
class UnlearnResult:
    """What :func:`run_unlearn` produced."""

    out: Path
    model: Path
    steps: int
    terms: dict[str, float]
    edit_stats: dict[str, float]
    is_main: bool = True
    """False in the other processes of a data-parallel launch (which write nothing and should report nothing)."""
    skipped: bool = False  # already done with the same settings: nothing was recomputed

    def pipeline(self, **kwargs):
        """The unlearned model as a diffusers pipeline (``DiffusionPipeline.from_pretrained(model)``)."""
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(str(self.model), use_safetensors=True, **kwargs)

    def as_dict(self) -> dict:
        return {"out": str(self.out), "model": str(self.model), "steps": self.steps, **self.terms, **self.edit_stats}


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
                                 runtime_bytes=process_rss() if on_cpu else 0)


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
            + (f"; ascent bound {m.ascent_bound} {m.ascent_cap:g}" if m.ascent_bound != "none" else "")
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


def _build_optimizer(params: list[torch.nn.Parameter], config: UnlearnConfig, method: Method) -> torch.optim.Optimizer:
    lr = config.lr or method.default_lr
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UserError("optimizer adamw8bit needs bitsandbytes: pip install 'metaunlearn[bnb]'") from exc
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


def unlearn_inputs(config: UnlearnConfig, backbone: Backbone | None = None) -> dict:
    """Validate the stage's inputs and fingerprint them: the start model's identity and every data set the meta
    objective reads (a one-line :class:`UserError` for a missing or malformed one)."""
    from metaunlearn.data.caching import data_fingerprint
    from metaunlearn.identity import file_digest, model_identity, module_digest

    if backbone is not None and not (Path(backbone.source) / "model_index.json").is_file():
        model = {"path": None, "fingerprint": module_digest(backbone.pipe)[:16]}
    else:
        identity = model_identity(config.model)
        model = {"path": identity.path, "fingerprint": identity.fingerprint}
    data: dict[str, str] = {}
    if config.meta is not None:
        roles, extra = meta_data_paths(config)
        for label, path in [*roles.values(), *extra.values()]:
            key = label.removeprefix("data.")
            if path.suffix == ".safetensors":
                if not path.is_file():
                    raise UserError(f"{label}: cached set not found: {path}")
                data[key] = file_digest(path)[:16]
            else:
                if not path.is_dir():
                    raise UserError(f"{label}: data folder not found: {path}")
                data[key] = data_fingerprint(path)[:16]
    return {"model": model, "data": data}


def unlearn_settings(config: UnlearnConfig, inputs: dict) -> dict:
    """Everything the unlearned model depends on (the stage's settings hash): the resolved config without the
    output folder, checkpoint cadence and gradient accumulation (a data-parallel launch computes the same global
    batch however it splits it), and the inputs' fingerprints. ``steps`` is kept apart: more steps resume
    a finished run from its checkpoint."""
    cfg = config.model_dump(mode="json", exclude={"out", "checkpoint_every", "steps", "gradient_accumulation_steps"})
    return {"config": cfg, "inputs": inputs, "steps": config.steps}


def provenance(config: UnlearnConfig, inputs: dict, settings: dict) -> dict:
    """The record saved inside the model folder: how this model was made (read back by ``attack``)."""
    return {
        "method": config.method.name,
        "variant": "meta" if config.meta is not None else "plain",
        "base_model": inputs["model"],
        "settings_key": settings_key(settings),
        "config": config.model_dump(mode="json"),
    }


def run_unlearn(
    config: UnlearnConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    backbone: Backbone | None = None,
) -> UnlearnResult:
    """Run the stage (see the module docstring). ``backbone`` may be given to skip loading ``config.model``.

    Resumes by default: a finished run with the same settings is returned as it is, a started one continues from
    its checkpoint; earlier outputs made with other settings are refused unless ``overwrite``. Inputs are checked
    before anything is written.
    """
    from metaunlearn.atomic import atomic_write_text
    from metaunlearn.backbones.loading import load_backbone
    from metaunlearn.identity import PROVENANCE_FILE
    from metaunlearn.runs import RunDir, remove_outputs
    from metaunlearn.training.accel import make_accelerator, stage_device
    from metaunlearn.training.loop import CHECKPOINT_DIR, LOG_FILE, TrainLoop, checkpoint_step

    assert config.out is not None
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file, not a folder")
    accelerator = make_accelerator(config.mixed_precision, config.gradient_accumulation_steps, cpu=config.device == "cpu")
    # the settings in force (a launcher's included) are the ones recorded with the model
    config = config.model_copy(update={"mixed_precision": accelerator.mixed_precision,
                                       "gradient_accumulation_steps": accelerator.gradient_accumulation_steps})
    if accelerator.mixed_precision not in ("no", "bf16"):
        raise UserError(f"unlearning runs in bf16 or fp32, not {accelerator.mixed_precision} (launcher setting)")
    main = accelerator.is_main_process
    progress = progress and main
    device = stage_device(config.device, accelerator)
    method = config.method.build()
    fingerprints = unlearn_inputs(config, backbone)  # validates every input before anything is written
    settings = unlearn_settings(config, fingerprints)
    outputs = [out / MODEL_DIR, out / CHECKPOINT_DIR, out / LOG_FILE]
    complete = [out / MODEL_DIR / "model_index.json"]
    status = RunDir(out, create=False).status("unlearn", settings, outputs=outputs, resumable=("steps",),
                                              complete=complete)
    reached = checkpoint_step(out) if out.is_dir() else None
    if status.state == "partial" and reached is not None and reached > config.steps:
        raise UserError(f"{out} holds a checkpoint at step {reached}, past steps: {config.steps}; "
                        "pass --overwrite to start over")
    accelerator.wait_for_everyone()  # every process has read the folder's state before the main one writes
    run = RunDir(out)
    if main:
        status = run.begin("unlearn", settings, overwrite=overwrite, what=f"unlearned model {out}", outputs=outputs,
                           resumable=("steps",), complete=complete)
    elif status.state == "changed" and not overwrite:
        raise UserError(f"unlearned model {out} was made with other settings ({status.describe()} changed)")
    if status.state == "done":
        info = status.record or {}
        return UnlearnResult(out, out / MODEL_DIR, int(info.get("steps", config.steps)), dict(info.get("terms", {})),
                             dict(info.get("edit_stats", {})), is_main=main, skipped=True)
    if status.state == "changed" and main:  # --overwrite: the old checkpoint and log belong to other settings
        remove_outputs([out / CHECKPOINT_DIR, out / LOG_FILE, out / EDIT_FILE])
    if main:
        atomic_write_text(out / CONFIG_FILE, json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    accelerator.wait_for_everyone()
    if backbone is None:
        backbone = load_backbone(config.model, device=device, dtype=torch.float32)
    subset = config.trainable or method.trainable_subset
    generator = torch.Generator().manual_seed(config.seed)  # for set-up only; training draws from the loop's
    inputs = UnlearnInputs(backbone, list(config.forget_prompts), list(config.preserve_prompts), generator, subset)
    if config.gradient_checkpointing:
        backbone.unet.enable_gradient_checkpointing()
    backbone.unet.train()

    probe = durability_probe(backbone, config, progress)  # before any edit: its reference is the start weights
    base_loss = method.apply(inputs)  # ESD/SDD build their teacher from the original weights; UCE/RECE edit now
    if main and method.edit_stats:
        atomic_write_text(out / EDIT_FILE, json.dumps(method.edit_stats, indent=2) + "\n")
    elif main:
        (out / EDIT_FILE).unlink(missing_ok=True)  # from an earlier run with another method
    steps, terms = 0, {}
    trains = base_loss is not None or config.meta is not None
    if not trains and main:  # a closed-form edit alone: no training outputs of an earlier run may linger
        (out / LOG_FILE).unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    if trains:
        meta_subset = config.meta.trainable if config.meta is not None else None
        base_params = None
        if meta_subset is not None and meta_subset != subset:
            base_params = backbone.set_trainable(subset)
            chosen = {id(p) for p in base_params} | {id(p) for _, p in backbone.named_trainable(meta_subset)}
            params = [p for p in backbone.unet.parameters() if id(p) in chosen]
            for p in params:
                p.requires_grad_(True)
        else:
            params = backbone.set_trainable(subset)
        autocast = autocast_factory(backbone.device, config.mixed_precision)
        loop = TrainLoop(
            out,
            config.steps,
            checkpoint_every=config.checkpoint_every,
            seed=config.seed,
            accelerator=accelerator,
            description=f"unlearn {config.variant}",
            progress=progress,
            split_batches=True,
        )
        if config.meta is not None:
            with accelerator.main_process_first():  # the main process encodes and caches; the others read the cache
                data = load_meta_data(backbone, config, progress)
            objective = MetaObjective(
                backbone, config.meta, data, params, base_loss=base_loss, base_params=base_params, seed=config.seed,
                autocast=autocast, shard=loop.shard,
            )
        else:
            objective = PlainObjective(params, base_loss, config.clip_grad_norm, autocast=autocast, shard=loop.shard)
        optimizer = _build_optimizer(params, config, method)
        loop.track("unet", backbone.unet)
        loop.track("optimizer", optimizer)
        if base_loss is not None and base_loss.state_dict():
            loop.track("method", base_loss)
        began = time.time()
        every = config.signals.every if probe is not None else 0

        def step_fn(step: int) -> dict[str, float]:
            terms = objective.step(step, loop.generator, optimizer)
            if every and step % every == 0:
                terms.update(probe())
            return terms

        try:
            result = loop.run(step_fn, resume=True)
        finally:
            objective.close()
        steps, terms = result.step, result.terms
        terms = {**terms, "train_s": round(time.time() - began, 3)}
    backbone.unet.eval()
    if config.gradient_checkpointing:
        backbone.unet.disable_gradient_checkpointing()
    backbone.unet.requires_grad_(False)
    model_dir = out / MODEL_DIR
    if main:
        if probe is not None:
            final = {"steps": steps, **probe(), "reference": str(config.signals.reference or config.model)}
            atomic_write_text(out / SIGNALS_FILE, json.dumps(final, indent=2) + "\n")
        else:
            (out / SIGNALS_FILE).unlink(missing_ok=True)
        backbone.save(model_dir, {PROVENANCE_FILE: provenance(config, fingerprints, settings)})
        run.mark_done("unlearn", settings, steps=steps, terms=terms, edit_stats=dict(method.edit_stats))
    accelerator.wait_for_everyone()
    return UnlearnResult(out, model_dir, steps, terms, dict(method.edit_stats), is_main=main)


# ``metaunlearn.unlearn`` is both this module and the API function :func:`metaunlearn.api.unlearn`: importing the
# module binds it as the package attribute, so the module itself forwards calls to the function.
class _UnlearnModule(sys.modules[__name__].__class__):
    def __call__(self, *args: Any, **kwargs: Any) -> UnlearnResult:
        from metaunlearn.api import unlearn

        return unlearn(*args, **kwargs)


sys.modules[__name__].__class__ = _UnlearnModule
