"""The unlearning stage's config (:class:`UnlearnConfig`) and how a config file becomes one.

A config file is either this stage's config at the top level, or a whole experiment file with an ``unlearn:``
section; then ``model`` and ``data`` (a :class:`~metaunlearn.data.config.DataConfig`) may come from the file's top
level, and ``forget_prompts`` default to the forget data set's prompts. Relative paths are relative to the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from metaunlearn.backbones.base import TRAINABLE_SUBSETS
from metaunlearn.config import StrictModel, check_sections, read_yaml, validate
from metaunlearn.errors import UserError
from metaunlearn.meta.config import MetaConfig
from metaunlearn.methods.config import MethodSpec
from metaunlearn.training.durability import SignalsConfig


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
        description="further forget sets a simulated attack may finetune on: name -> image folder or cached set",
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
        "adamw", description="outer optimizer; adamw8bit: bitsandbytes' 8-bit AdamW (pip install 'metaunlearn[bnb]')"
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
        None, ge=1,
        description="micro-batches per batch (same update); null: ACCELERATE_GRADIENT_ACCUMULATION_STEPS, else 1",
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
    from metaunlearn.config import resolve_path

    return None if path is None else resolve_path(path, base)


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
    if "unlearn" in raw:  # an experiment file: its other top-level keys must be sections too
        check_sections(raw, str(path))
    base = path.resolve().parent
    run_dir = default_run_dir(path, raw.get("run_dir") if isinstance(raw.get("run_dir"), str) else None)
    # the data root absolute: relative paths of the section are resolved against the config's folder below
    data = unlearn_section(raw, base, str(path), run_dir.absolute() / "data") if "unlearn" in raw else dict(raw)
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


def resolve_unlearn_config(config: Any, *, model: Any = None, method: str | None = None, meta: bool | None = None,
                           out: str | Path | None = None, **settings: Any) -> tuple[UnlearnConfig, Any]:
    """``(config, in-memory pipeline or None)`` from what :func:`metaunlearn.unlearn` was given (see there)."""
    overrides: dict[str, Any] = dict(settings)
    if method is not None:
        from metaunlearn.methods import get_method

        get_method(method)
        overrides["method_name"] = method
    if meta is not None:
        overrides["meta"] = meta
    if out is not None:
        overrides["out"] = Path(out)
    pipeline = None
    if model is not None and not isinstance(model, (str, Path)):
        pipeline, model = model, Path(getattr(getattr(model, "config", None), "_name_or_path", "") or "in-memory")
    if model is not None:
        overrides["model"] = Path(model).resolve() if pipeline is None else model
    if isinstance(config, (str, Path)):
        cfg = load_unlearn_config(Path(config), overrides)
    else:
        data = config.model_dump() if isinstance(config, UnlearnConfig) else dict(config)
        for key, value in overrides.items():
            if key == "method_name":
                data["method"] = {"name": value}
            elif key == "meta":
                data["meta"] = (data.get("meta") or {}) if value else None
            else:
                data[key] = value
        cfg = validate(UnlearnConfig, data, "unlearn settings")
    if cfg.out is None:
        raise UserError("give an output folder (out=...)")
    return cfg, pipeline
