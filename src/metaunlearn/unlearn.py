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

The config (:class:`UnlearnConfig`, config files) lives in :mod:`metaunlearn.unlearn_config`, the data the stage
reads in :mod:`metaunlearn.unlearn_data`; their names are also importable from here.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metaunlearn.backbones.base import Backbone
from metaunlearn.errors import UserError
from metaunlearn.meta.objective import MetaObjective, PlainObjective, autocast_factory
from metaunlearn.methods import Method, UnlearnInputs
from metaunlearn.runs import settings_key
from metaunlearn.training.durability import SIGNALS_FILE
from metaunlearn.unlearn_config import (  # noqa: F401  (also importable from here)
    SplitPaths,
    UnlearnConfig,
    UnlearnData,
    load_unlearn_config,
    resolve_unlearn_config,
    unlearn_section,
)
from metaunlearn.unlearn_data import (  # noqa: F401  (also importable from here)
    durability_probe,
    load_meta_data,
    meta_data_paths,
    meta_roles,
)

MODEL_DIR = "model"
CONFIG_FILE = "config.json"
EDIT_FILE = "edit.json"


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


def _made_with(model_dir: Path) -> str | None:
    """The settings key a saved model records in its provenance file (``None`` when unreadable)."""
    from metaunlearn.identity import PROVENANCE_FILE

    try:
        return json.loads((model_dir / PROVENANCE_FILE).read_text()).get("settings_key")
    except (OSError, ValueError, AttributeError):
        return None


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
    before anything is written. The output folder is locked (:mod:`metaunlearn.locking`) once they are.
    """
    with contextlib.ExitStack() as locks:
        return _run_unlearn(config, overwrite, progress, backbone, locks)


def _run_unlearn(config: UnlearnConfig, overwrite: bool, progress: bool, backbone: Backbone | None,
                 locks: contextlib.ExitStack) -> UnlearnResult:
    from metaunlearn.atomic import atomic_write_text
    from metaunlearn.backbones.loading import load_backbone
    from metaunlearn.identity import PROVENANCE_FILE
    from metaunlearn.runs import RunDir, drop_aside, restore_aside, set_aside
    from metaunlearn.training.accel import make_accelerator, stage_device
    from metaunlearn.training.loop import CHECKPOINT_DIR, LOG_FILE, TrainLoop, checkpoint_step

    ASIDE = (CHECKPOINT_DIR, LOG_FILE, EDIT_FILE, SIGNALS_FILE, CONFIG_FILE)  # what other settings' runs leave

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
    if main:  # one process at a time writes the folder (the other processes of a launch write nothing)
        from metaunlearn.locking import folder_lock

        locks.enter_context(folder_lock(out, "unlearn output folder"))
    outputs = [out / MODEL_DIR, out / CHECKPOINT_DIR, out / LOG_FILE]
    complete = [out / MODEL_DIR / "model_index.json"]
    status = RunDir(out, create=False).status("unlearn", settings, outputs=outputs, resumable=("steps",),
                                              complete=complete)
    reached = checkpoint_step(out) if out.is_dir() and not status.previous else None
    if status.state == "partial" and reached is not None and reached > config.steps:
        raise UserError(f"{out} holds a checkpoint at step {reached}, past steps: {config.steps}; "
                        "pass --overwrite to start over")
    accelerator.wait_for_everyone()  # every process has read the folder's state before the main one writes
    run = RunDir(out)
    if main:
        status = run.begin("unlearn", settings, overwrite=overwrite, what=f"unlearned model {out}", outputs=outputs,
                           resumable=("steps",), complete=complete,
                           owned=(out / MODEL_DIR / PROVENANCE_FILE).is_file())
    elif status.state == "changed" and not overwrite:
        raise UserError(f"unlearned model {out} was made with other settings ({status.describe()} changed)")
    if status.previous and main:  # the settings an unfinished --overwrite replaced: their outputs come back
        restore_aside(out, ASIDE)
    if status.previous and status.state == "done" and _made_with(out / MODEL_DIR) != settings_key(settings):
        status.state = "partial"  # the redo saved its model before it could record that: rebuild these settings'
    if status.state == "done":
        info = status.record or {}
        return UnlearnResult(out, out / MODEL_DIR, int(info.get("steps", config.steps)), dict(info.get("terms", {})),
                             dict(info.get("edit_stats", {})), is_main=main, skipped=True)
    if status.state == "changed" and main:  # --overwrite: kept beside until the new settings' model is saved
        set_aside(out, ASIDE)
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
        drop_aside(out)
    accelerator.wait_for_everyone()
    return UnlearnResult(out, model_dir, steps, terms, dict(method.edit_stats), is_main=main)


def unlearn_from(config: Any, *, overwrite: bool = False, progress: bool = True, **given: Any) -> UnlearnResult:
    """:func:`metaunlearn.unlearn`: the stage on a config path, mapping or model with overrides (see there)."""
    from metaunlearn.backbones.loading import backbone_for
    from metaunlearn.progress import quiet_libraries

    cfg, pipeline = resolve_unlearn_config(config, **given)
    quiet_libraries()
    backbone = backbone_for(pipeline) if pipeline is not None else None
    return run_unlearn(cfg, overwrite=overwrite, progress=progress, backbone=backbone)


# ``metaunlearn.unlearn`` is both this module and the API function :func:`metaunlearn.api.unlearn`: importing the
# module binds it as the package attribute, so the module itself runs the stage when called.
class _UnlearnModule(sys.modules[__name__].__class__):
    def __call__(self, *args: Any, **kwargs: Any) -> UnlearnResult:
        return unlearn_from(*args, **kwargs)


sys.modules[__name__].__class__ = _UnlearnModule
