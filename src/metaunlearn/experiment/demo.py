"""The main job: the packaged toy experiment (``configs/toy_demo.yaml``), with ``--quick`` and ``--seeds`` variants."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from rich.console import Console

from metaunlearn.errors import UserError
from metaunlearn.experiment.runner import Experiment, load_experiment


QUICK_METHOD = "uce"  # the cheapest base method (a closed-form edit); its meta variant is the quick run's cost
QUICK_SNAPSHOTS = [0, 25]


def demo_config_path(robust: bool = False) -> Path:
    """The packaged demo config (inside the installed package, next to the shipped toy model); ``robust``: the
    evaluation against attackers the defence never simulated (``configs/toy_robust.yaml``)."""
    name = "toy_robust.yaml" if robust else "toy_demo.yaml"
    return Path(str(resources.files("metaunlearn") / "configs" / name))


TEMPLATES = ("toy_demo", "toy_robust")
"""Packaged experiment configs ``metaunlearn config init`` copies (their toy:// paths resolve wherever they go)."""


def init_config(name: str, dest: Path | None = None, overwrite: bool = False) -> Path:
    """Write a copy of the packaged config ``name`` to ``dest`` (a file, or a folder for ``NAME.yaml``; default
    ``NAME.yaml`` in the working directory) and return its path; an existing file is kept unless ``overwrite``."""
    from metaunlearn.atomic import atomic_write_text

    if name not in TEMPLATES:
        raise UserError(f"no packaged config {name!r} (choose {', '.join(TEMPLATES)})")
    source = demo_config_path(robust=name == "toy_robust")
    target = Path(dest) if dest is not None else Path(f"{name}.yaml")
    if target.is_dir():
        target = target / f"{name}.yaml"
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it, or give another DEST")
    return atomic_write_text(target, source.read_text())


def attack_suite_path() -> Path:
    """The wider attack suite ``--all-attacks`` adds (``configs/toy_attack_suite.yaml``)."""
    return Path(str(resources.files("metaunlearn") / "configs" / "toy_attack_suite.yaml"))


def with_attack_suite(attack, primary: str, quick: bool):
    """The demo's attack section plus the kinds and prompt attacks of :func:`attack_suite_path` (validated).

    The kinds run on the primary set; ``quick`` leaves out sequential kinds (their first set is not generated)."""
    from metaunlearn.attacks.suite_config import AttackSuiteConfig
    from metaunlearn.config import read_yaml, validate

    extra = read_yaml(attack_suite_path())
    kinds = {k: v for k, v in extra.get("kinds", {}).items() if not (quick and v.get("before"))}
    raw = attack.model_dump(mode="json")
    own = raw["sets"][primary]
    own["modes"] = [*(own.get("modes") or raw["modes"]), *[k for k in extra.get("primary_kinds", []) if k in kinds]]
    raw.update(kinds=kinds, reference_lr=extra.get("reference_lr"), prompt_attacks=extra.get("prompt_attacks", {}),
               prompt_attack_set=extra.get("prompt_attack_set"))
    return validate(AttackSuiteConfig, raw, str(attack_suite_path()))


def build_demo(quick: bool = False, seeds: int = 1, run_dir: Path | None = None, console: Console | None = None,
               all_attacks: bool = False, *, create: bool = True, overwrite: bool = False,
               robust: bool = False) -> Experiment:
    """The demo experiment: the full grid, or ``quick`` (UCE plain and meta, the primary attack to 25 steps), or
    ``robust`` (UCE plain and meta against a wide grid of attacks, most of them never simulated).

    ``seeds`` > 1 replicates the whole grid (unlearning and attacks) under seeds 0..N-1; the report then gives
    mean ± std over them. ``all_attacks`` adds the wider attack suite (DreamBooth, textual inversion, cross-attention
    SGD, related-first sequential finetuning, and three prompt attacks; :func:`with_attack_suite`) in its own run dir.
    """
    if seeds < 1:
        raise UserError("--seeds must be at least 1")
    if robust and (quick or all_attacks):
        raise UserError("--robust is its own experiment; give it without --quick or --all-attacks")
    config, _, base = load_experiment(demo_config_path(robust))
    grid = config.grid.model_copy(update={"seeds": list(range(seeds))})
    attack = config.attack
    ev = config.eval
    default_dir = Path("runs/demo-robust" if robust else "runs/demo")  # in the working directory, not in the package
    if quick:  # one method, the primary attack only: the meta effect in a few minutes
        grid = grid.model_copy(update={"methods": [m for m in grid.methods if m.name == QUICK_METHOD]})
        primary = config.report.primary_set or "hrm-m"
        sets = {primary: attack.sets[primary].model_copy(update={"modes": ["full"], "lrs": None, "lora_lrs": None, "snapshot_steps": None})}
        attack = attack.model_copy(update={"sets": sets, "snapshot_steps": QUICK_SNAPSHOTS})
        default_dir = default_dir.with_name(default_dir.name + "-quick")
    if all_attacks:
        attack = with_attack_suite(attack, config.report.primary_set or "hrm-m", quick)
        default_dir = default_dir.with_name(default_dir.name + "-all-attacks")
    if seeds > 1:
        default_dir = default_dir.with_name(f"{default_dir.name}-{seeds}seeds")
    attack_data = {k: v for k, v in config.attack_data.items() if k in attack.sets}
    config = config.model_copy(update={"grid": grid, "attack": attack, "eval": ev, "attack_data": attack_data})
    return Experiment(config, base, run_dir or default_dir, console, create=create, overwrite=overwrite)
