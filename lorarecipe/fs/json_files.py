"""JSON that lorarecipe reads from disk (or from a file's metadata) -> data, bounded and located.

Every JSON document lorarecipe parses comes from a file a pull request may have written: a pipeline's
``model_index.json`` and configs, shard indexes, lock files, manifests, build state, cache metadata,
a LoRA's ``lora_adapter_metadata``. ``read_json``/``parse_json`` cap its size (read at most the limit
plus one byte) and its nesting depth (also what keeps ``json`` from a ``RecursionError``), refuse
text that is not UTF-8, and raise a lorarecipe error naming the file; never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ValidationError

from ..errors import LorarecipeError, Problem, UnsafeInputError

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "FilePath",
    "JsonFileError",
    "JsonProblem",
    "check_shape",
    "json_depth_exceeds",
    "parse_json",
    "read_json",
    "shape_problems",
]

MAX_JSON_BYTES = 16 * 1024 * 1024
#: Real configs, locks and manifests nest a handful of levels; 64 leaves room and stays far below
#: the interpreter's recursion limit for everything that walks the data afterwards.
MAX_JSON_DEPTH = 64


class JsonProblem(ValueError):
    """Why a text is not acceptable JSON (without the file name: callers add it)."""


class JsonFileError(UnsafeInputError, ValueError):
    """A JSON file (or value) refused, naming it. Also a ``ValueError``, so code that treated invalid
    JSON as "unreadable" (``except ValueError``) still does."""


def json_depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether containers nest deeper than ``limit`` in parsed JSON (iterative: no recursion)."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            if depth >= limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _loads(text: str | bytes, max_depth: int, **options: Any) -> Any:
    """``json.loads`` with its failures as :class:`JsonProblem`; errors raised by ``options`` hooks
    propagate unchanged."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonProblem(f"not UTF-8 text (byte {exc.start})") from None
    try:
        value = json.loads(text, **options)
    except RecursionError:
        raise JsonProblem(f"nested deeper than {max_depth} levels (limit)") from None
    except json.JSONDecodeError as exc:
        raise JsonProblem(f"not valid JSON ({str(exc)[:120]})") from None
    if json_depth_exceeds(value, max_depth):
        raise JsonProblem(f"nested deeper than {max_depth} levels (limit)")
    return value


def parse_json(
    text: str | bytes,
    source: str,
    *,
    error: type[LorarecipeError] = JsonFileError,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    expect: type | None = None,
    **options: Any,
) -> Any:
    """JSON text -> data; ``error("<source>: <why>")`` when too long, too deep, invalid or (with
    ``expect``) of another top-level type. ``options`` go to :func:`json.loads` (hooks)."""
    if len(text) > max_bytes:
        raise error(f"{source}: larger than {max_bytes} bytes (limit)")
    try:
        value = _loads(text, max_depth, **options)
    except JsonProblem as exc:
        raise error(f"{source}: {exc}") from None
    if expect is not None and not isinstance(value, expect):
        wanted = "a JSON object" if expect is dict else f"a JSON {expect.__name__}"
        raise error(f"{source}: not {wanted} (found {_kind(value)})")
    return value


def read_json(
    path: Path,
    *,
    error: type[LorarecipeError] = JsonFileError,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    expect: type | None = dict,
    shown: str | None = None,
) -> Any:
    """A JSON file -> data (by default it must be an object); reads at most ``max_bytes + 1`` bytes.
    A missing or unreadable file is ``error`` too, naming it."""
    where = shown or str(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise error(f"{where}: file not found") from None
    except OSError as exc:
        raise error(f"{where}: cannot be read ({exc.strerror or exc})") from None
    return parse_json(raw, where, error=error, max_bytes=max_bytes, max_depth=max_depth, expect=expect)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_WANTED = {
    "model_type": "expected an object",
    "model_attributes_type": "expected an object",
    "dict_type": "expected an object",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "bool_type": "expected true or false",
    "float_type": "expected a number",
}


def shape_problems(model: type[BaseModel], value: Any) -> list[str]:
    """``value`` checked against ``model`` (strictly: no ``"1"`` for 1, no ``true`` for 1) -> one
    ``key.path: what is wrong`` line per problem; empty when it has the shape."""
    try:
        model.model_validate(value, strict=True)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            found = error.get("input")
            shown = repr(found) if not isinstance(found, (dict, list)) else _kind(found)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            wanted = _WANTED.get(error["type"])
            if error["type"] == "missing":
                detail = "missing"
            elif error["type"] == "extra_forbidden":
                detail = "unknown key"
            else:
                detail = f"{wanted or error['msg'].lower()}, found {shown}"
            lines.append(f"{_location(tuple(error['loc']))}: {detail}")
        return lines
    return []


_Model = TypeVar("_Model", bound=BaseModel)


def check_shape(model: type[_Model], value: Any, source: str, error: type[LorarecipeError]) -> _Model:
    """``value`` as ``model``; ``error("<source>: <key>: <why>")`` with every problem otherwise."""
    lines = shape_problems(model, value)
    if lines:
        raise error(f"{source}: {lines[0]}", [Problem(f"{source}: {line}") for line in lines])
    return model.model_validate(value, strict=True)


def _file_path(value: str) -> str:
    """A relative path a lock or manifest lists: at most 4096 bytes, parts at most 255 (longer ones
    make every ``stat`` fail with ENAMETOOLONG)."""
    if len(value.encode("utf-8", "surrogatepass")) > 4096:
        raise ValueError("a path longer than 4096 bytes")
    if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in value.split("/")):
        raise ValueError("a path part longer than 255 bytes")
    return value


#: The type of a file path inside a lock file or manifest (checked for length before any ``stat``).
FilePath = Annotated[str, AfterValidator(_file_path)]
