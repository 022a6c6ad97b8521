"""The configuration reference page (``docs/configuration-reference.md``), generated from the pydantic models.

Every config section is one table: key, type, default, description and allowed values (``Literal`` choices).
Regenerate the checked-in page after changing a config model::

    python -m metaunlearn.docs_reference --write docs/configuration-reference.md

``tests/test_docs.py`` fails while the checked-in page differs from what this module produces.
"""

from __future__ import annotations

import enum
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

REGENERATE = "python -m metaunlearn.docs_reference --write docs/configuration-reference.md"


def _roots() -> list[tuple[type[BaseModel], str, str]]:
    """(model, where it sits, how a config file reaches it) of every top of the walk, in page order."""
    from metaunlearn.experiment.config import ExperimentConfig
    from metaunlearn.methods import METHODS
    from metaunlearn.unlearn_config import UnlearnConfig

    roots = [
        (ExperimentConfig, "(top level)", "the top level of a `metaunlearn run` config"),
        (UnlearnConfig, "unlearn", "the `unlearn` section, or the top level of a `metaunlearn unlearn` config"),
    ]
    for name, method in METHODS.items():
        roots.append((method.Config, f"unlearn.method.params ({name})",
                      f"`params` of method `{name}` (`unlearn.method.params`, `grid.methods[].params`)"))
    return roots


def _anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def _strip_optional(annotation):
    """``(inner annotation, True)`` for ``X | None``, else ``(annotation, False)``."""
    args = typing.get_args(annotation)
    if _is_union(annotation) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return annotation, False


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _models_in(annotation) -> list[type[BaseModel]]:
    """The config models an annotation holds (directly, in a list, a dict's values, a union)."""
    if _is_model(annotation):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        for model in _models_in(arg):
            if model not in found:
                found.append(model)
    return found


def _literal_values(annotation) -> list:
    """The choices of every ``Literal`` (or Enum) inside an annotation."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [member.value for member in annotation]
    values: list = []
    for arg in typing.get_args(annotation):
        values += [v for v in _literal_values(arg) if v not in values]
    return values


def _type_name(annotation) -> str:
    """A short, readable name of an annotation; config models link to their own table."""
    inner, optional = _strip_optional(annotation)
    name = _plain_type_name(inner)
    return f"{name} \\| null" if optional else name


def _plain_type_name(annotation) -> str:
    if annotation is type(None):
        return "null"
    if _is_model(annotation):
        return f"[{annotation.__name__}](#{_anchor(annotation)})"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "choice"
    if origin is typing.Annotated:
        return _plain_type_name(args[0])
    if _is_union(annotation):
        return " \\| ".join(_plain_type_name(a) for a in args)
    if origin in (list, set, frozenset) or origin is typing.Sequence:
        return f"list[{_plain_type_name(args[0])}]" if args else "list"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{_plain_type_name(args[0])}]"
        return "[" + ", ".join(_plain_type_name(a) for a in args) + "]"
    if origin is dict:
        return f"map {_plain_type_name(args[0])} → {_plain_type_name(args[1])}" if args else "map"
    if annotation is typing.Any:
        return "any"
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return "choice"
        if issubclass(annotation, Path):
            return "path"
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__)
    return re.sub(r"typing\.|[\w.]+\.(?=\w)", "", str(annotation))


def _value(value) -> str:
    """A default written as YAML would write it, in a code span."""
    if isinstance(value, BaseModel):
        return f"{{{type(value).__name__} defaults}}"
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, Path):
        text = str(value)
    elif isinstance(value, (list, tuple)):
        if value and all(isinstance(v, BaseModel) for v in value):
            return f"[{type(value[0]).__name__} defaults]"
        text = "[" + ", ".join(_value(v).strip("`") for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k}: {_value(v).strip('`')}" for k, v in value.items()) + "}"
    else:
        text = str(value)
    return f"`{text}`" if text else '`""`'


def _default(field) -> str:
    if field.default_factory is not None:
        try:
            return _value(field.default_factory())
        except TypeError:  # a factory that needs the validated data
            return "(computed)"
    if field.default is PydanticUndefined:
        return "**required**"
    return _value(field.default)


def _prose(text: str) -> str:
    """Docstring or description text as Markdown: reST roles and double backticks become code spans, and angle
    brackets and asterisks are escaped so that ``<name>`` is not read as HTML nor ``*`` as emphasis."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", " ".join(str(text).split())).replace("``", "`")
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside code spans only
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return "`".join(parts)


def _cell(text: str) -> str:
    return _prose(text).replace("|", "\\|")


def _table(model: type[BaseModel]) -> list[str]:
    lines = ["| key | type | default | description | allowed values |", "|---|---|---|---|---|"]
    for key, field in model.model_fields.items():
        name = field.alias or key
        allowed = ", ".join(f"`{v}`" for v in _literal_values(field.annotation))
        default = _default(field).replace("|", "\\|")
        lines.append(f"| `{name}` | {_type_name(field.annotation)} | {default} | "
                     f"{_cell(field.description or '')} | {_cell(allowed)} |")
    return lines


def _walk() -> tuple[list[type[BaseModel]], dict[type[BaseModel], list[str]]]:
    """Every config model reachable from the roots, in first-seen order, with the key paths that reach it."""
    order: list[type[BaseModel]] = []
    where: dict[type[BaseModel], list[str]] = {}
    queue = [(model, path) for model, path, _ in _roots()]
    while queue:
        model, path = queue.pop(0)
        if model not in where:
            order.append(model)
            where[model] = []
        if path in where[model]:
            continue
        where[model].append(path)
        for key, field in model.model_fields.items():
            inner, _ = _strip_optional(field.annotation)
            suffix = "[]" if typing.get_origin(inner) in (list, tuple) else ""
            suffix = ".<name>" if typing.get_origin(inner) is dict else suffix
            prefix = "" if path == "(top level)" else f"{path}."
            for sub in _models_in(field.annotation):
                queue.append((sub, f"{prefix}{field.alias or key}{suffix}"))
    return order, where


def render() -> str:
    """The whole reference page as Markdown."""
    intros = {model: text for model, _, text in _roots()}
    order, where = _walk()
    out = [
        "# Configuration reference",
        "",
        "<!-- generated by metaunlearn.docs_reference: do not edit by hand -->",
        "",
        "Every key of every config section: its type, default, a one-line description and, for a choice, the allowed",
        "values. Generated from the pydantic models; regenerate with",
        f"`{REGENERATE}`. An unknown or mistyped key is an error naming the key and the file.",
        "How the sections fit together, and why the defaults are what they are: [Configuration](configuration.md),",
        "[The meta objective](meta-objective.md), [Attacks](attacks.md).",
        "",
        "Sections: " + ", ".join(f"[{m.__name__}](#{_anchor(m)})" for m in order) + ".",
        "",
    ]
    for model in order:
        doc = (model.__doc__ or "").strip().split("\n\n")[0]
        out += [f"## {model.__name__}", ""]
        if model in intros:
            out += [f"Read from {intros[model]}.", ""]
        out += [_prose(doc), "", "At: " + ", ".join(f"`{p}`" for p in where[model]) + ".", ""]
        out += _table(model) + [""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if argv[:1] == ["--write"] and len(argv) == 2:
        from metaunlearn.atomic import atomic_write_text

        atomic_write_text(Path(argv[1]), text)
        return 0
    if argv:
        print("usage: python -m metaunlearn.docs_reference [--write FILE]", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
