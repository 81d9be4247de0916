"""Turn pydantic validation errors into ``found X, expected Y`` problems at YAML positions.

Pydantic's own messages ("Input should be a valid integer") name neither the YAML line nor what was
found, so we rebuild each message from the error type, the input and the model's field constraints.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable
from typing import Any

import annotated_types
from pydantic import BaseModel, ValidationError

from llamactl.errors import Problem

Loc = tuple[str | int, ...]
# Given a loc inside the validated value: (dotted source path, line, col, raw text or None).
Locator = Callable[[Loc, bool], tuple[str, int, int, str | None]]


def describe(value: Any, raw: str | None = None) -> str:
    """How a found value is shown: with its YAML type, and ${VAR} text instead of secret values."""
    if raw is not None:
        return f'string "{raw}"'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value:g}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f'string "{shown}"'
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _strip(annotation: Any) -> tuple[Any, list[Any]]:
    """Unwrap Annotated and Optional: (base type, constraint metadata)."""
    metadata: list[Any] = []
    while True:
        if typing.get_origin(annotation) is typing.Annotated:
            args: Any = typing.get_args(annotation)
            annotation = args[0]
            for meta in args[1:]:
                metadata.extend(getattr(meta, "metadata", [meta]))
            continue
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation, metadata


def _annotation_at(model: type[BaseModel], loc: Loc) -> tuple[Any, list[Any]] | None:
    """The annotation (and constraints) a loc points at, walking models, dicts and lists."""
    current: Any = model
    metadata: list[Any] = []
    for part in loc:
        current, _ = _strip(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            info = current.model_fields.get(str(part))
            if info is None:
                return None
            current, metadata = _strip(info.annotation)
            metadata = list(info.metadata) + metadata
        elif typing.get_origin(current) is dict:
            current, metadata = _strip(typing.get_args(current)[1])
        elif typing.get_origin(current) is list:
            current, metadata = _strip(typing.get_args(current)[0])
        else:
            return None
    return _strip(current)[0], metadata


def _bounds_text(kind: str, metadata: list[Any], ctx: dict[str, Any]) -> str:
    low: Any = None
    high: Any = None
    low_strict = False
    for meta in metadata:
        if isinstance(meta, annotated_types.Ge):
            low = meta.ge
        elif isinstance(meta, annotated_types.Gt):
            low, low_strict = meta.gt, True
        elif isinstance(meta, annotated_types.Le):
            high = meta.le
    if low is None and high is None:  # fall back on what pydantic tells
        low = ctx.get("ge", ctx.get("gt"))
        low_strict = "gt" in ctx
        high = ctx.get("le")
    if low is not None and high is not None and not low_strict:
        return f"{kind} from {low} to {high}"
    parts = []
    if low is not None:
        parts.append(f"greater than {low}" if low_strict else f"of at least {low}")
    if high is not None:
        parts.append(f"at most {high}")
    return f"{kind} " + " and ".join(parts)


def _expected(err: Any, model: type[BaseModel]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    found = _annotation_at(model, tuple(err["loc"]))
    base, metadata = found if found else (None, [])
    number = "an integer" if base is int else "a number"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return _bounds_text(number, metadata, ctx)
    simple = {
        "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
        "float_type": "a number", "float_parsing": "a number",
        "bool_type": "true or false", "bool_parsing": "true or false",
        "string_type": "a string", "list_type": "a list",
        "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    }
    if kind in simple:
        text = simple[kind]
        if text in ("an integer", "a number") and metadata:
            return _bounds_text(text, metadata, {})
        return text
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return str(err["msg"]).lower()


def _fields(model: type[BaseModel], loc: Loc) -> list[str]:
    found = _annotation_at(model, loc)
    if found and isinstance(found[0], type) and issubclass(found[0], BaseModel):
        return [name for name in found[0].model_fields if name != "keys"]
    return []


def from_validation(
    exc: ValidationError, model: type[BaseModel], locate: Locator, file: str,
    ignore: frozenset[str] = frozenset(),
) -> list[Problem]:
    """One problem per pydantic error, except errors of the types in ``ignore``."""
    problems: list[Problem] = []
    for err in exc.errors():
        loc: Loc = tuple(err["loc"])
        kind = err["type"]
        if kind in ignore:
            continue
        if kind == "extra_forbidden":
            path, line, col, _ = locate(loc, True)
            key = str(loc[-1])
            names = _fields(model, loc[:-1])
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            if close:
                message = f'found unknown key "{key}", did you mean "{close[0]}"?'
            else:
                message = f'found unknown key "{key}", expected one of: {", ".join(names)}'
        elif kind == "missing":
            path, line, col, _ = locate(loc[:-1], True)
            message = f'found no "{loc[-1]}", expected {_expected_missing(model, loc)}'
        else:
            path, line, col, raw = locate(loc, False)
            message = f"found {describe(err['input'], raw)}, expected {_expected(err, model)}"
        problems.append(Problem(file, line, col, path, message))
    return problems


def _expected_missing(model: type[BaseModel], loc: Loc) -> str:
    parent = _annotation_at(model, loc[:-1]) if loc[:-1] else (model, [])
    if parent and isinstance(parent[0], type) and issubclass(parent[0], BaseModel):
        info = parent[0].model_fields.get(str(loc[-1]))
        if info is not None and info.description:
            return info.description
    found = _annotation_at(model, loc)
    base = found[0] if found else None
    if typing.get_origin(base) is dict or (isinstance(base, type) and issubclass(base, BaseModel)):
        return f'a "{loc[-1]}" mapping'
    return f'a value for "{loc[-1]}"'
