"""Base unlearning methods as plug-ins: one file + one config each, and this registry.

Adding a method = a new module with a :class:`~metaunlearn.methods.base.Method` subclass + one line in
:data:`METHODS`.
"""

from __future__ import annotations

from metaunlearn.errors import UserError
from metaunlearn.methods.base import BaseLoss, Method, UnlearnInputs
from metaunlearn.methods.esd import ESD
from metaunlearn.methods.rece import RECE
from metaunlearn.methods.sdd import SDD
from metaunlearn.methods.uce import UCE

METHODS: dict[str, type[Method]] = {
    "esd": ESD,
    "sdd": SDD,
    "uce": UCE,
    "rece": RECE,
}


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``, or a one-line :class:`UserError` listing the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method '{name}' (choose {', '.join(METHODS)})") from None


__all__ = ["METHODS", "BaseLoss", "Method", "UnlearnInputs", "get_method"]
