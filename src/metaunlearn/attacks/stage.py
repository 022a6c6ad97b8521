"""The attack stage of one model: relearning attacks on every attack set, keyed by what the results depend on.

Flow::

    model_identity(model_dir)           resolved path + content fingerprint; method and variant from the folder's
                                        own record (written by ``unlearn``), never from its name
    data_digest(set folder) per set     the attack data
    Evaluator(eval)                     prompts (incl. prompt files), detector and quality inputs
    RunDir(run_dir).begin(...)          per attack set: resume when these settings match, refuse when the results
                                        there were made with others (another model, batch size, prompts, ...)
    run_sweep(...)                      the attack runs still missing (attacks/<name>/<set>/*.jsonl, grids/...)

Results are filed under ``name`` (default ``<method>-<variant>``, ``base`` for a model ``unlearn`` did not make).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metaunlearn.attacks.run_spec import AttackSpec
from metaunlearn.attacks.suite_config import AttackSuiteConfig
from metaunlearn.errors import UserError
from metaunlearn.identity import VARIANTS, ModelIdentity, file_digest, model_identity


@dataclass
class AttackOutcome:
    """What :func:`attack_model` produced: result rows (one per snapshot step) and where they are."""

    name: str
    method: str
    variant: str
    identity: ModelIdentity
    rows: list[dict] = field(default_factory=list)
    run_dir: Path | None = None
    skipped_sets: list[str] = field(default_factory=list)  # already done with the same settings
    is_main: bool = True  # False in the other processes of a data-parallel launch (they write and report nothing)


def resolve(path: str | Path, base: Path | None) -> Path:
    from metaunlearn.config import resolve_path

    return resolve_path(path, base)


def data_digest(path: Path, where: str) -> str:
    """Fingerprint of an attack set: an image folder (metadata + image files) or a cached ``.safetensors`` set."""
    from metaunlearn.data.caching import data_fingerprint

    if path.is_file() and path.suffix == ".safetensors":
        return file_digest(path)[:16]
    if path.is_dir():
        return data_fingerprint(path)[:16]
    raise UserError(f"{where}: data not found: {path} (an image folder or a cached .safetensors set)")


def set_folders(suite: AttackSuiteConfig, base: Path | None, only: list[str] | None = None) -> dict[str, Path]:
    """The data path of every selected attack set (relative paths from ``base``, the config file's folder)."""
    names = list(suite.sets)
    for name in only or []:
        if name not in suite.sets:
            raise UserError(f"unknown attack set {name!r} (config defines: {', '.join(names)})")
    out = {}
    for name in names if only is None else only:
        if not suite.sets[name].data:
            raise UserError(f"attack set '{name}' names no data folder")
        out[name] = resolve(suite.sets[name].data, base)
    return out


def load_attack_sets(backbone, folders: dict[str, Path], cache_dir: Path, progress: bool) -> dict:
    """The :class:`CachedSet` of every attack set (image folders are encoded once and cached)."""
    from metaunlearn.data.caching import load_set

    return {name: load_set(backbone, path, cache_dir, f"attack set '{name}'", progress).to(backbone.device)
            for name, path in folders.items()}


def evaluator_inputs(evaluator) -> dict:
    """What an evaluator's numbers depend on beyond its config (:meth:`Evaluator.inputs`; empty without one)."""
    return {} if evaluator is None else evaluator.inputs()


def labels(identity: ModelIdentity, method: str | None, variant: str | None) -> tuple[str, str]:
    """Method and variant of a model: its own record; ``method``/``variant`` only for a model without one. Any model
    can be attacked as a ``reference`` and a plain model as a ``control`` (roles, not provenance)."""
    if variant == "reference":
        return method or "reference", variant
    if variant == "control" and identity.variant == "plain":  # a plain model in the equal-damage control's role
        return identity.method, variant
    if identity.variant != "base":
        for given, recorded, what in ((method, identity.method, "method"), (variant, identity.variant, "variant")):
            if given is not None and given != recorded:
                raise UserError(f"{identity.path} was unlearned with {what} {recorded!r}, not {given!r} "
                                "(its unlearn_config.json says so)")
        return identity.method, identity.variant
    variant = variant or "base"
    if variant not in VARIANTS:
        raise UserError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    return method or "base", variant


def default_name(method: str, variant: str) -> str:
    if variant in ("base", "reference"):
        return variant if method in ("base", "reference") else method
    return f"{method}-{variant}"


def _outputs(run_dir: Path, name: str, set_name: str, specs: list[AttackSpec]) -> list[Path]:
    from metaunlearn.attacks.sweep import grid_file, run_file

    paths = []
    for spec in specs:
        paths += [run_file(run_dir, name, set_name, spec), grid_file(run_dir, name, set_name, spec, 0).parent]
    return paths


def _set_settings(common: dict, set_name: str, path: Path, digest: str, specs: list[AttackSpec]) -> dict:
    return {**common, "set": set_name, "data": {"path": str(path.resolve()), "digest": digest},
            "specs": [s.model_dump(mode="json") for s in specs]}


def attack_model(model_dir: str | Path | None, suite: AttackSuiteConfig, run_dir: str | Path, *, lock: bool = True,
                 **options) -> AttackOutcome:
    """Attack the model in ``model_dir`` with every spec of ``suite`` on every (selected) set; resumable.

    ``base_dir`` is the config file's folder (relative data, prompt and weight paths). ``stage_key`` names the
    stage markers (default: ``name``; the runner adds its grid seed). ``backbone`` attacks a model in memory
    instead of ``model_dir`` (identified by a digest of its weights). Under ``torchrun`` / ``accelerate launch``
    every process trains its share of each batch and the main process alone evaluates, writes and returns rows. Results already in ``run_dir`` under the
    same name and set but made with other settings — another model, batch size, prompts, data — are refused
    with one line unless ``overwrite``, which deletes them first. The run folder is locked
    (:mod:`metaunlearn.locking`) unless ``lock`` is false (a ``run``'s stages: their parent holds its lock).
    """
    with contextlib.ExitStack() as locks:
        return _attack_model(model_dir, suite, run_dir, locks=locks if lock else None, **options)


def _attack_model(
    model_dir: str | Path | None,
    suite: AttackSuiteConfig,
    run_dir: str | Path,
    *,
    eval_config=None,
    base_dir: str | Path | None = None,
    name: str | None = None,
    method: str | None = None,
    variant: str | None = None,
    sets: list[str] | None = None,
    stage_key: str | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    dtype: str | torch.dtype = "fp32",
    progress: bool = True,
    evaluator=None,
    backbone=None,
    locks: contextlib.ExitStack | None = None,
) -> AttackOutcome:
    from metaunlearn.atomic import atomic_write_text, ensure_dir
    from metaunlearn.attacks.step_zero import StepZeroEvaluations
    from metaunlearn.attacks.sweep import (
        STEP_ZERO_DIR,
        ModelInfo,
        check_budget,
        check_name,
        read_run_rows,
        run_file,
        run_sweep,
    )
    from metaunlearn.backbones.loading import load_backbone
    from metaunlearn.devices import resolve_dtype
    from metaunlearn.locking import folder_lock, is_main_launch_process
    from metaunlearn.runs import RunDir, refuse_foreign, remove_outputs
    from metaunlearn.training.accel import make_accelerator, stage_device
    from metaunlearn.training.parallel import Shard

    base = Path(base_dir) if base_dir is not None else None
    if backbone is not None:
        from metaunlearn.identity import module_digest

        identity = ModelIdentity("(in memory)", module_digest(backbone.pipe)[:16], "base", "base")
    else:
        identity = model_identity(model_dir)
    method, variant = labels(identity, method, variant)
    name = check_name(name or default_name(method, variant), "model name")
    key = stage_key or name
    _check_tokens(suite, model_dir, backbone)
    folders = set_folders(suite, base, sets)
    # sets sequential kinds train on first and the soft prompt attacks' image set are inputs too
    needed = {**folders, **set_folders(suite, base, sorted(suite.stage_sets() - set(folders)))}
    digests = {set_name: data_digest(path, f"attack set '{set_name}'") for set_name, path in needed.items()}
    if evaluator is None and eval_config is not None:
        from metaunlearn.metrics.evaluate import Evaluator

        evaluator = Evaluator(eval_config, base_dir=base)
    check_budget(suite, evaluator)
    common = {
        "model": {"path": identity.path, "fingerprint": identity.fingerprint},
        "name": name, "method": method, "variant": variant,
        "eval": evaluator.config.model_dump(mode="json") if evaluator is not None else None,
        "eval_inputs": evaluator_inputs(evaluator),
        "grid_images": suite.grid_images,
        "stage_data": {n: digests[n] for n in sorted(suite.stage_sets())},
    }
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} is a file, not a folder")
    if locks is not None and is_main_launch_process():  # one process at a time writes the run folder
        locks.enter_context(folder_lock(run_dir, "run folder"))
    run = RunDir(run_dir, create=False)
    todo: dict[str, Path] = {}
    outcome = AttackOutcome(name, method, variant, identity, run_dir=run_dir)
    checks = []  # every set is checked before any marker is written: one refusal leaves the folder as it was
    for set_name, path in folders.items():
        specs = list(suite.specs(set_name))
        settings = _set_settings(common, set_name, path, digests[set_name], specs)
        outputs = _outputs(run_dir, name, set_name, specs)
        finished = [run_file(run_dir, name, set_name, spec) for spec in specs]
        status = run.status(f"attack/{key}/{set_name}", settings, outputs=outputs, complete=finished)
        if status.state == "changed" and not overwrite:
            if any(k.startswith("model.") for k in status.changed):
                old = (status.record or {}).get("settings", {}).get("model", {})
                raise UserError(
                    f"{run_dir / 'attacks' / name} holds results of another model ({old.get('path')}, fingerprint "
                    f"{old.get('fingerprint')}); give this one another --name, or pass --overwrite to replace them"
                )
            raise UserError(f"attack results '{name}' on set '{set_name}' in {run_dir} were made with other settings "
                            f"({status.describe()} changed); pass --overwrite to redo them, or choose another run "
                            "folder")
        if status.state == "changed" and status.record is None:  # --overwrite keeps what metaunlearn did not make
            refuse_foreign(run_dir, [p for p in outputs if p.exists()], f"attack results '{name}' on set '{set_name}'")
        checks.append((set_name, path, specs, settings, outputs, finished))
    prompts: list[tuple[str, dict, list[Path]]] = []  # one stage per prompt attack: a changed one redoes only it
    if suite.prompt_attacks:
        from metaunlearn.attacks.prompts import prompt_attack_file

        for attack_name, spec in suite.prompt_attacks.items():
            settings = {**common, "prompt_attack": {"name": attack_name, **spec.model_dump(mode="json")},
                        "seeds": suite.seeds}
            files = [prompt_attack_file(run_dir, name, attack_name, seed) for seed in suite.seeds]
            status = run.status(f"attack/{key}/prompt-{attack_name}", settings, outputs=files, complete=files)
            if status.state == "changed" and not overwrite:
                raise UserError(f"prompt attack '{attack_name}' results of '{name}' in {run_dir} were made with other "
                                f"settings ({status.describe()} changed); pass --overwrite to redo them")
            prompts.append((attack_name, settings, files))
    # under a data-parallel launch every process trains; the main one alone writes, after all have read the folder
    accelerator = make_accelerator(None, None, cpu=device == "cpu" or backbone is not None)
    main = outcome.is_main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    run = RunDir(run_dir)
    for set_name, path, specs, settings, outputs, finished in checks:
        if not main:
            todo[set_name] = path
            continue
        status = run.begin(f"attack/{key}/{set_name}", settings, overwrite=overwrite, outputs=outputs,
                           complete=finished)
        if status.state == "done":
            outcome.rows += read_run_rows(run_dir, name, set_name, specs)
            outcome.skipped_sets.append(set_name)
            continue
        if status.state == "changed":  # --overwrite: delete what the old settings made, incl. their grid PNGs
            old_specs = [AttackSpec.model_validate(s) for s in (status.record or {}).get("settings", {}).get("specs", [])]
            remove_outputs(_outputs(run_dir, name, set_name, specs + old_specs))
        todo[set_name] = path
    prompt_todo: dict[str, dict] = {}
    for attack_name, settings, files in prompts if main else []:
        status = run.begin(f"attack/{key}/prompt-{attack_name}", settings, overwrite=overwrite, outputs=files,
                           complete=files)
        if status.state == "changed":
            remove_outputs(files)
        if status.state != "done":
            prompt_todo[attack_name] = settings
    # every process takes the main one's decisions: the same sets to run, or none
    plan = _shared(accelerator, [*todo, *(f"prompt:{n}" for n in prompt_todo)] if main else None)
    todo = {n: p for n, p in todo.items() if n in plan}
    if not todo and not any(n.startswith("prompt:") for n in plan):
        return outcome
    info = ModelInfo(name, method, variant, identity.path, identity.fingerprint)
    resolved = {**common, "attack": suite.model_dump(mode="json"), "sets": {n: str(p) for n, p in folders.items()}}
    if backbone is None:
        dev = stage_device(device, accelerator)
        backbone = load_backbone(model_dir, device=dev, dtype=dtype if isinstance(dtype, torch.dtype)
                                 else resolve_dtype(dtype, dev))
    cache = Path(cache_dir) if cache_dir is not None else (
        resolve(suite.cache_dir, base) if suite.cache_dir else run_dir / "cache")
    wanted = {**todo, **{n: needed[n] for n in suite.stage_sets()}}
    with accelerator.main_process_first():  # the main process encodes and caches; the others read the cache
        data = load_attack_sets(backbone, wanted, cache, progress and main)
    step_zero = StepZeroEvaluations(identity.fingerprint, cache / STEP_ZERO_DIR)  # shared by every set
    for set_name in todo:
        specs = list(suite.specs(set_name))
        settings = _set_settings(common, set_name, todo[set_name], digests[set_name], specs)
        rows = run_sweep(backbone, data, suite, run_dir, info, evaluator, progress=progress and main,
                         cache_dir=cache, only=[set_name], shard=Shard.of(accelerator), autocast=accelerator.autocast,
                         step_zero=step_zero)
        accelerator.wait_for_everyone()
        if main:
            run.mark_done(f"attack/{key}/{set_name}", settings, runs=len(specs))
        outcome.rows += rows
    if prompt_todo:  # the main process alone (prompt attacks change no weight and train nothing shared)
        from metaunlearn.attacks.prompts import run_prompt_attacks

        run_prompt_attacks(backbone, {n: suite.prompt_attacks[n] for n in prompt_todo}, suite.seeds, evaluator,
                           run_dir, info, data.get(suite.concept_set), progress=progress)
        for attack_name, settings in prompt_todo.items():
            run.mark_done(f"attack/{key}/prompt-{attack_name}", settings)
    if main:  # the resolved settings, once the work they describe is done
        record = "config.json" if key == name else f"config.{key[len(name) + 1:]}.json"
        atomic_write_text(ensure_dir(run_dir / "attacks" / name) / record, json.dumps(resolved, indent=2) + "\n")
    return outcome


def _check_tokens(suite: AttackSuiteConfig, model_dir, backbone) -> None:
    """Every textual-inversion token must be new to the model's tokenizers (refused before any work)."""
    from metaunlearn.attacks.tokens import check_new_tokens, folder_tokenizers

    specs = [spec for set_name in suite.sets for spec in suite.specs(set_name)]
    tokens = sorted({spec.textual_inversion.token for spec in specs if spec.mode == "textual_inversion"})
    if not tokens:
        return
    if backbone is not None:
        tokenizers = [getattr(backbone.pipe, n, None) for n in ("tokenizer", "tokenizer_2")]
    else:
        tokenizers = folder_tokenizers(model_dir)
    check_new_tokens(tokenizers, tokens, str(model_dir) if backbone is None else "the model")


def _shared(accelerator, names: list[str] | None) -> list[str]:
    """The main process's list, on every process of a launch (one process: ``names`` itself)."""
    if accelerator.num_processes == 1:
        return names or []
    from accelerate.utils import broadcast_object_list

    box = [names]
    broadcast_object_list(box, from_process=0)
    return box[0] or []
