"""pydantic ``ValidationError`` -> located :class:`~lorarecipe.errors.Problem` list.

Each pydantic error location is mapped back to the recipe data path (``merges.mix.method``) and its
``file:line:col`` through the document's position map; union noise is folded into one message and
unknown keys get a did-you-mean hint from the model's fields.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from ..diagnostics import did_you_mean
from ..errors import Problem
from .models import Recipe
from .yaml_source import PathKey, YamlDocument, path_text

__all__ = ["pydantic_problems"]


def _data_path(loc: tuple[Any, ...], data: Any) -> tuple[PathKey, bool]:
    """pydantic loc -> (path into the data, whether the error is about a mapping key)."""
    path: list[str | int] = []
    node = data
    is_key = False
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if part == "[key]":
            is_key = True
            break
        if isinstance(node, (dict, list)) and isinstance(part, (str, int)) and _has(node, part):
            path.append(part)
            node = node[part]  # type: ignore[index]
        elif last and isinstance(node, dict) and isinstance(part, str) and _is_field_like(part):
            path.append(part)  # a missing field: keep its name, positions fall back to the parent
            node = None
    return tuple(path), is_key


def _is_field_like(part: str) -> bool:
    # union tags such as 'float', 'ComponentWeights', 'list[...]', 'function-after[...]' are not data keys
    return bool(re.match(r"^[a-z_][a-z0-9_]*$", part)) and part not in {
        "float",
        "int",
        "str",
        "bool",
        "list",
        "dict",
        "none",
    }


def _unwrap(tp: Any, node: Any) -> Any:
    """Annotated/Union -> the member that matches ``node``'s shape."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = _pick_member(members, node)
            continue
        return tp


def _pick_member(members: list[Any], node: Any) -> Any:
    unwrapped = [_unwrap(m, None) if typing.get_origin(m) is typing.Annotated else m for m in members]
    if isinstance(node, dict):
        for m in unwrapped:
            if isinstance(m, type) and issubclass(m, BaseModel):
                kind = m.model_fields.get("kind")
                if kind is None or node.get("kind") in typing.get_args(kind.annotation):
                    return m
        for m in unwrapped:
            if typing.get_origin(m) is dict:
                return m
    if isinstance(node, list):
        for m in unwrapped:
            if typing.get_origin(m) is list:
                return m
    return unwrapped[0] if unwrapped else Any


def _model_at(path: PathKey, data: Any) -> type[BaseModel] | None:
    tp: Any = Recipe
    node = data
    for part in path:
        tp = _unwrap(tp, node)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return None
            tp = field.annotation
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        else:
            return None
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None  # type: ignore[index]
    tp = _unwrap(tp, node)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _has(node: Any, part: str | int) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(part, int) and 0 <= part < len(node)


_TYPE_WORDS = {
    "float_type": "a number",
    "float_parsing": "a number",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a mapping",
    "list_type": "a list",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "int_from_float": "an integer",
    "finite_number": "a finite number",
}


def _message(err: dict[str, Any], path: PathKey, data: Any) -> tuple[str, str | None]:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    field = path[-1] if path and isinstance(path[-1], str) else "value"
    if kind == "extra_forbidden":
        model = _model_at(path[:-1], data)
        fields = list(model.model_fields) if model else []
        return f"unknown key {field!r}", did_you_mean(str(field), fields) or (
            f"allowed keys: {', '.join(fields)}" if fields else None
        )
    if kind == "missing":
        return f"missing required key {field!r}", None
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = did_you_mean(str(value), expected) or (
            f"expected one of: {', '.join(expected)}" if expected else None
        )
        return f"unknown {field} {value!r}", hint
    if kind == "string_pattern_mismatch":
        return (
            f"invalid name {value!r}",
            "names use letters, digits, '-' and '_', start with a letter or "
            "digit, at most 64 characters (variables: letters, digits and '_')",
        )
    if kind == "union_tag_invalid":
        expected = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
        return f"unknown output kind {ctx.get('tag')!r}", did_you_mean(str(ctx.get("tag")), expected) or (
            f"expected one of: {', '.join(expected)}"
        )
    if kind == "union_tag_not_found":
        return "missing 'kind'", "one of: pipeline, single_file, lora, grid"
    if kind in _TYPE_WORDS:
        return f"expected {_TYPE_WORDS[kind]}, got {_describe(value)}", None
    msg = str(err.get("msg", kind))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg, None


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def pydantic_problems(exc: ValidationError, data: Any, doc: YamlDocument) -> list[Problem]:
    """Every pydantic error -> a located :class:`Problem`, with union noise folded."""
    entries: list[tuple[PathKey, bool, dict[str, Any]]] = []
    for error in exc.errors(include_url=False):
        err: dict[str, Any] = dict(error)
        path, is_key = _data_path(tuple(err["loc"]), data)
        entries.append((path, is_key, err))
    deepest = [
        e for e in entries if not any(len(o[0]) > len(e[0]) and o[0][: len(e[0])] == e[0] for o in entries)
    ]
    by_path: dict[tuple[PathKey, bool], list[dict[str, Any]]] = {}
    for path, is_key, err in deepest:
        by_path.setdefault((path, is_key), []).append(err)
    problems: list[Problem] = []
    for (path, is_key), errs in by_path.items():
        if errs[0]["type"] == "union_tag_invalid" and isinstance(errs[0].get("input"), dict):
            path = (*path, "kind")  # point at the kind itself
        type_errs = [e for e in errs if e["type"] in _TYPE_WORDS]
        if len(type_errs) > 1 and len(type_errs) == len(errs):
            words = sorted({_TYPE_WORDS[e["type"]] for e in type_errs})
            message = f"expected {' or '.join(words)}, got {_describe(errs[0].get('input'))}"
            pairs: list[tuple[str, str | None]] = [(message, None)]
        else:
            pairs = [_message(e, path, data) for e in errs if e["type"] not in _TYPE_WORDS or len(errs) == 1]
        for message, hint in dict.fromkeys(pairs):
            kind = errs[0]["type"]
            on_key = (
                is_key
                or kind in ("extra_forbidden", "missing")
                or (kind in ("value_error", "assertion_error") and isinstance(errs[0].get("input"), dict))
            )
            span_path = path[:-1] if kind == "missing" else path
            span = doc.positions.key(span_path) if on_key else doc.positions.value(span_path)
            if span is None:
                span = doc.positions.value(())
            problems.append(Problem(message, path_text(path), span, hint))
    if not problems:
        problems.append(Problem("invalid recipe", span=doc.positions.value(())))
    return problems
