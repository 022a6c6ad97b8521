"""The Python API: the stages as functions for notebooks and scripts (the CLI commands are thin layers over these).

    import metaunlearn
    unlearned = metaunlearn.unlearn("experiment.yaml", method="uce", meta=True, out="runs/nb/uce-meta")
    attacked = metaunlearn.attack(unlearned.model, "experiment.yaml", run_dir="runs/nb")
    attacked.rows                      # one dict per attack run × snapshot step (attacked.to_pandas() with pandas)
    metaunlearn.evaluate(unlearned.pipeline(), "experiment.yaml").metrics

Models are given as diffusers model folders or as diffusers pipelines already in memory; results are plain
objects (lists of dicts, ``.to_pandas()`` when pandas is installed). Every function takes a config as a YAML path
(its relative paths are relative to the file), a mapping, or the validated pydantic model, and resumes or refuses
exactly like its command: nothing finished is recomputed, nothing made with other settings is silently reused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metaunlearn.errors import UserError


def _to_pandas(rows: list[dict]):
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("to_pandas() needs pandas (pip install pandas); .rows is a plain list of dicts") from None
    return pd.DataFrame(rows)


def _section(config: Any, key: str, model_cls, required: bool = True):
    """``(section model or None, base folder)`` from a YAML path, a whole-file mapping, a section mapping or model."""
    from metaunlearn.config import check_sections, read_yaml, validate

    if config is None:
        return None, None
    if isinstance(config, model_cls):
        return config, None
    base = None
    if isinstance(config, (str, Path)):
        path = Path(config)
        data, base, source = read_yaml(path), path.resolve().parent, str(path)
    elif isinstance(config, Mapping):
        data, source = dict(config), f"{key} settings"
    else:
        raise TypeError(f"expected a YAML path, a mapping or a {model_cls.__name__}, got {type(config).__name__}")
    if key in data:
        if base is not None:  # a config file of sections: a top-level typo is refused, not ignored
            check_sections(data, source)
        data = data[key]
    elif required and not isinstance(config, Mapping):
        raise UserError(f"{source}: no '{key}' section")
    if data is None:
        return None, base
    if not isinstance(data, Mapping):
        raise UserError(f"{source}: '{key}' must be a mapping")
    return validate(model_cls, dict(data), source), base


def toy_model() -> Path:
    """The shipped toy text-to-image model (a diffusers ``StableDiffusionPipeline`` folder; see the README)."""
    from importlib import resources

    return Path(str(resources.files("metaunlearn") / "assets" / "toy" / "model"))


def toy_reference() -> Path:
    """The shipped retrain reference: the toy model's recipe without any red triangle (a diffusers folder)."""
    from importlib import resources

    return Path(str(resources.files("metaunlearn") / "assets" / "toy" / "retrain_red_triangle" / "model"))


# ---- generate ----------------------------------------------------------------------------------------------------
def generate(
    model: str | Path | Any,
    prompts: list[str],
    out: str | Path,
    *,
    images_per_prompt: int = 1,
    seed: int = 0,
    sampler: Mapping | Any | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Sample an image folder (``metadata.jsonl`` captions) from ``model``; image ``i`` uses seed ``seed + i``.

    ``sampler``: ``steps``, ``guidance``, ``negative_prompt``, ``batch_size``, ``resolution``. A folder generated
    with the same settings is kept as it is; one made with other settings is refused unless ``overwrite``.
    """
    from metaunlearn.backbones.loading import backbone_for
    from metaunlearn.config import validate
    from metaunlearn.data.config import SamplerSettings
    from metaunlearn.data.generate import generate_folder

    if sampler is not None and not isinstance(sampler, SamplerSettings):
        sampler = validate(SamplerSettings, dict(sampler), "sampler")
    return generate_folder(backbone_for(model, device), list(prompts), out, images_per_prompt=images_per_prompt,
                           seed=seed, sampler=sampler, overwrite=overwrite, progress=progress)


# ---- unlearn -----------------------------------------------------------------------------------------------------
def unlearn(
    config: str | Path | Mapping | Any,
    *,
    model: str | Path | Any | None = None,
    method: str | None = None,
    meta: bool | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
):
    """Erase a concept; returns an :class:`~metaunlearn.unlearn.UnlearnResult` (``.model`` folder, ``.pipeline()``).

    ``config``: an unlearn config or experiment file (path), a mapping, or an :class:`UnlearnConfig`. ``model``
    replaces its model: a folder, or a diffusers pipeline in memory (trained in place: pass a folder to keep the
    original). ``method``, ``meta`` (True: add the meta objective, False: plain), ``out`` and any other config key
    (``steps=10``, ``seed=1``) override the config. Resumes a run with the same settings in ``out``; another
    run there is refused unless ``overwrite``.
    """
    from metaunlearn.unlearn import unlearn_from

    return unlearn_from(config, model=model, method=method, meta=meta, out=out, overwrite=overwrite,
                        progress=progress, **settings)


# ---- attack ------------------------------------------------------------------------------------------------------
@dataclass
class AttackResult:
    """Result rows of one model's attacks (``rows``: one dict per attack run × snapshot step)."""

    name: str
    method: str
    variant: str
    fingerprint: str
    run_dir: Path
    rows: list[dict] = field(default_factory=list)
    skipped_sets: list[str] = field(default_factory=list)
    is_main: bool = True  # False in the other processes of a data-parallel launch (no rows there)
    references: list[AttackResult] = field(default_factory=list)  # the reference models, attacked alike

    def summary(self, metric: str = "forget_rate") -> list[dict]:
        """Mean, std (over seeds), min, max, n of ``metric`` per attack set × mode × lr × step."""
        from metaunlearn.attacks.sweep import aggregate

        return aggregate(self.rows, metric, by=("attack_set", "mode", "lr", "step"))

    def to_pandas(self):
        return _to_pandas(self.rows)


def attack(
    model: str | Path | Any,
    config: str | Path | Mapping | Any,
    run_dir: str | Path,
    *,
    eval: str | Path | Mapping | Any | None = None,
    base_dir: str | Path | None = None,
    name: str | None = None,
    method: str | None = None,
    variant: str | None = None,
    sets: list[str] | None = None,
    overwrite: bool = False,
    device: str = "auto",
    dtype: str | torch.dtype = "fp32",
    progress: bool = True,
    references: list[str | Path | Mapping] | None = None,
) -> AttackResult:
    """Relearning attacks on ``model`` (a folder, or a diffusers pipeline in memory, left unchanged afterwards).

    ``config``: a YAML path with an ``attack`` section (and ``eval``, used unless ``eval`` is given), a mapping or an
    :class:`AttackSuiteConfig`. Results go to ``run_dir`` under ``name`` (default ``<method>-<variant>`` from the
    model folder's own record). Finished runs with the same settings are reused; results there from another model
    or other settings are refused unless ``overwrite``. ``references`` (model folders, or ``{name, path}``) get the
    identical sweep under the variant ``reference``; :func:`against_reference` compares with them.
    """
    from metaunlearn.attacks.stage import attack_model
    from metaunlearn.attacks.suite_config import AttackSuiteConfig
    from metaunlearn.backbones.loading import backbone_for
    from metaunlearn.config import read_yaml
    from metaunlearn.metrics.config import EvalConfig

    suite, base = _section(config, "attack", AttackSuiteConfig)
    if eval is None and isinstance(config, (str, Path)):  # the file's own eval section, when it has one
        eval_config = _section(config, "eval", EvalConfig)[0] if "eval" in read_yaml(config) else None
    else:
        eval_config, eval_base = _section(eval, "eval", EvalConfig, required=False)
        base = base or eval_base
    base = Path(base_dir) if base_dir is not None else base
    from metaunlearn.progress import quiet_libraries

    quiet_libraries()
    from metaunlearn.devices import check_finetune_dtype, resolve_device

    check_finetune_dtype(dtype, resolve_device(device))
    backbone = None if isinstance(model, (str, Path)) else backbone_for(model)
    refs = _references(references, base)  # checked before any attack runs
    outcome = attack_model(
        model if backbone is None else None, suite, run_dir, eval_config=eval_config, base_dir=base, name=name,
        method=method, variant=variant, sets=sets, overwrite=overwrite, device=device, dtype=dtype,
        progress=progress, backbone=backbone,
    )
    ident = outcome.identity
    result = AttackResult(outcome.name, outcome.method, outcome.variant, ident.fingerprint, Path(run_dir),
                          outcome.rows, outcome.skipped_sets, outcome.is_main)
    for ref in refs:
        result.references.append(attack(ref.path, suite, run_dir, eval=eval_config, base_dir=base, name=ref.name,
                                        variant="reference", sets=sets, overwrite=overwrite, device=device,
                                        dtype=dtype, progress=progress))
    return result


def _references(references, base: Path | None) -> list:
    """``references`` as validated :class:`ReferenceModel` s, relative paths resolved against ``base``."""
    from metaunlearn.attacks.reference import ReferenceModel, reference_name
    from metaunlearn.config import resolve_path, validate

    out = []
    for ref in references or []:
        if isinstance(ref, (str, Path)):
            ref = {"name": reference_name(ref), "path": ref}
        ref = ref if isinstance(ref, ReferenceModel) else validate(ReferenceModel, dict(ref), "reference")
        path = resolve_path(ref.path, base or Path.cwd())
        if not path.is_dir():
            raise UserError(f"reference model not found: {path}")
        out.append(ref.model_copy(update={"path": path}))
    return out


def against_reference(run_dir: str | Path, *, references: list[str] | None = None, budget: int | None = None,
                      metric: str = "forget_rate", level: float = 0.5) -> list[dict]:
    """Every model of ``run_dir`` against each reference (default: every model attacked as ``reference``): excess
    relearning in points over steps 0..``budget`` and the whole curve, steps to ``level`` and their ratio, with
    seed intervals (see :mod:`metaunlearn.attacks.reference`)."""
    from metaunlearn.attacks.reference import against_reference as compare
    from metaunlearn.attacks.sweep import read_rows

    rows = read_rows(run_dir)
    names = references or sorted({r["model"] for r in rows if r.get("variant") == "reference"})
    if not names:
        raise UserError(f"{run_dir} holds no reference model (attack one with variant 'reference')")
    return compare(rows, names, budget=budget, metric=metric, level=level)


# ---- evaluate ----------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Metrics of one model (``metrics``: forget_rate, related_acc, rate/<set>, fid, clip_score, …) and the
    samples they were computed on (``images[set]``: ``[N,3,H,W]`` in [0,1]; ``prompts[set]``)."""

    metrics: dict[str, float]
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    prompts: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rows(self) -> list[dict]:
        return [{"metric": k, "value": v} for k, v in self.metrics.items()]

    def to_pandas(self):
        return _to_pandas([self.metrics])


def evaluate(
    model: str | Path | Any,
    config: str | Path | Mapping | Any,
    *,
    base_dir: str | Path | None = None,
    device: str = "cpu",
) -> EvalResult:
    """Sample every prompt set of the ``eval`` settings from ``model`` (a folder or a pipeline) and measure it.

    Nothing is written; the same seeds give the same numbers as the attack stage's step 0.
    """
    from metaunlearn.backbones.loading import backbone_for
    from metaunlearn.metrics.config import EvalConfig
    from metaunlearn.metrics.evaluate import Evaluator

    eval_config, base = _section(config, "eval", EvalConfig)
    evaluator = Evaluator(eval_config, base_dir=Path(base_dir) if base_dir is not None else base)
    outcome = evaluator.evaluate(backbone_for(model, device))
    return EvalResult(dict(outcome.metrics), dict(outcome.images), dict(outcome.prompts))
