"""The data the unlearning stage reads: the meta objective's cached sets and the durability signals' probe."""

from __future__ import annotations

from pathlib import Path

from metaunlearn.backbones.base import Backbone
from metaunlearn.data.caching import load_set
from metaunlearn.errors import UserError
from metaunlearn.meta.config import MetaConfig
from metaunlearn.meta.plan import MetaData
from metaunlearn.training.durability import DurabilityProbe, reference_weights
from metaunlearn.unlearn_config import UnlearnConfig


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
