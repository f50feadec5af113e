"""YAML text -> plain Python data plus a 1-based position for every node.

The loader only builds nodes with PyYAML's composer and converts them itself, so no YAML tag can
construct a Python object. It follows the YAML 1.2 core schema for plain scalars (``1e-4`` is a
float, ``yes`` and dates stay strings), rejects duplicate keys and explicit tags, supports anchors,
aliases and ``<<`` merge keys, and refuses resource bombs (alias expansion, depth, size) with the
limit named. It never imports torch or anything heavy.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import Problem, RecipeSyntaxError, SourceSpan

__all__ = [
    "LIMITS",
    "Limits",
    "PathKey",
    "PositionMap",
    "YamlDocument",
    "load_yaml",
    "parse_yaml",
    "path_text",
]

PathKey = tuple[str | int, ...]


@dataclass(frozen=True)
class Limits:
    """Resource limits for untrusted recipe text (named in the error when exceeded)."""

    max_bytes: int = 1_000_000
    max_nodes: int = 100_000
    max_depth: int = 64
    max_scalar_chars: int = 100_000


LIMITS = Limits()

_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"
_MERGE = "tag:yaml.org,2002:merge"
_ALLOWED_TAGS = {_STR, _SEQ, _MAP, _MERGE}

# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution), plain scalars only.
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL_TRUE = re.compile(r"^(?:true|True|TRUE)$")
_BOOL_FALSE = re.compile(r"^(?:false|False|FALSE)$")
_INT10 = re.compile(r"^[-+]?[0-9]+$")
_INT8 = re.compile(r"^0o[0-7]+$")
_INT16 = re.compile(r"^0x[0-9a-fA-F]+$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_INF = re.compile(r"^[-+]?\.(?:inf|Inf|INF)$")
_NAN = re.compile(r"^\.(?:nan|NaN|NAN)$")
_MAX_INT_DIGITS = 40  # larger literals are refused rather than turned into huge Python ints


def resolve_plain_scalar(text: str) -> object:
    """A plain (unquoted) YAML scalar -> None, bool, int, float or str (YAML 1.2 core schema)."""
    if _NULL.match(text):
        return None
    if _BOOL_TRUE.match(text):
        return True
    if _BOOL_FALSE.match(text):
        return False
    if _INT10.match(text) and len(text) <= _MAX_INT_DIGITS:
        return int(text)
    if _INT8.match(text) and len(text) <= _MAX_INT_DIGITS:
        return int(text[2:], 8)
    if _INT16.match(text) and len(text) <= _MAX_INT_DIGITS:
        return int(text[2:], 16)
    if _FLOAT.match(text) and not _INT10.match(text):
        return float(text)
    if _INF.match(text):
        return float("-inf") if text.startswith("-") else float("inf")
    if _NAN.match(text):
        return float("nan")
    return text


class _ComposeOnlyLoader(yaml.SafeLoader):
    """A SafeLoader with no implicit resolvers: every plain scalar composes as a str node,
    and we resolve types ourselves (YAML 1.2 rules instead of PyYAML's YAML 1.1 ones)."""

    yaml_implicit_resolvers: dict[Any, Any] = {}  # noqa: RUF012 (class attribute by PyYAML design)


_ComposeOnlyLoader.add_implicit_resolver(_MERGE, re.compile(r"^<<$"), ["<"])


@dataclass
class PositionMap:
    """Where each node of the document is: value spans and mapping-key spans by path."""

    file: str
    values: dict[PathKey, SourceSpan] = field(default_factory=dict)
    keys: dict[PathKey, SourceSpan] = field(default_factory=dict)

    def value(self, path: PathKey) -> SourceSpan | None:
        """Span of the value at ``path`` or of its deepest existing ancestor."""
        for i in range(len(path), -1, -1):
            span = self.values.get(tuple(path[:i]))
            if span is not None:
                return span
        return None

    def key(self, path: PathKey) -> SourceSpan | None:
        """Span of the mapping key that introduces ``path`` (falls back to the value)."""
        return self.keys.get(tuple(path)) or self.value(path)


@dataclass
class YamlDocument:
    """A parsed recipe file: data, positions and the raw text (for snippets)."""

    file: str
    text: str
    data: Any
    positions: PositionMap


def _span(file: str, node: yaml.Node) -> SourceSpan:
    start, end = node.start_mark, node.end_mark
    return SourceSpan(file, start.line + 1, start.column + 1, end.line + 1, end.column + 1)


def _mark_span(file: str, mark: Any) -> SourceSpan | None:
    if mark is None:
        return None
    return SourceSpan(file, mark.line + 1, mark.column + 1)


class _Converter:
    """Node tree -> Python data, recording positions and enforcing limits."""

    def __init__(self, file: str, limits: Limits) -> None:
        self.file = file
        self.limits = limits
        self.positions = PositionMap(file)
        self.count = 0
        self.problems: list[Problem] = []

    def fail(self, message: str, node: yaml.Node, path: PathKey, hint: str | None = None) -> None:
        self.problems.append(Problem(message, path_text(path), _span(self.file, node), hint))

    def convert(self, node: yaml.Node, path: PathKey, depth: int) -> Any:
        self.count += 1
        if self.count > self.limits.max_nodes:
            raise _LimitExceeded(
                f"the document expands to more than {self.limits.max_nodes} nodes "
                "(an alias bomb?); limit: max_nodes",
                node,
            )
        if depth > self.limits.max_depth:
            raise _LimitExceeded(
                f"nesting deeper than {self.limits.max_depth} levels; limit: max_depth", node
            )
        self.positions.values.setdefault(path, _span(self.file, node))
        if node.tag not in _ALLOWED_TAGS:
            self.fail(f"YAML tag {node.tag!r} is not allowed in a recipe", node, path, "remove the tag")
            return None
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, (*path, i), depth + 1) for i, item in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        self.fail("unsupported YAML node", node, path)  # pragma: no cover - composer yields only the above
        return None

    def _scalar(self, node: yaml.ScalarNode, path: PathKey) -> object:
        text = node.value
        if len(text) > self.limits.max_scalar_chars:
            raise _LimitExceeded(
                f"a scalar of {len(text)} characters exceeds max_scalar_chars={self.limits.max_scalar_chars}",
                node,
            )
        if node.style is None:  # plain scalar: resolve type
            return resolve_plain_scalar(text)
        return text

    def _mapping(self, node: yaml.MappingNode, path: PathKey, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_seen: dict[str, yaml.Node] = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merged.update(self._merge_sources(value_node, path, depth))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail("mapping keys must be plain strings", key_node, path)
                continue
            if key_node.tag != _STR:  # ``!!python/object:x key:`` and ``? !!binary …`` keys too
                message = f"YAML tag {key_node.tag!r} is not allowed in a recipe, not even on a key"
                self.fail(message, key_node, path, "remove the tag")
                continue
            key = key_node.value
            if key in first_seen:
                line = first_seen[key].start_mark.line + 1
                self.fail(f"duplicate key {key!r} (first defined on line {line})", key_node, (*path, key))
                continue
            first_seen[key] = key_node
            key_path = (*path, key)
            self.positions.keys[key_path] = _span(self.file, key_node)
            result[key] = self.convert(value_node, key_path, depth + 1)
        for key, value in merged.items():
            result.setdefault(key, value)
        return result

    def _merge_sources(self, node: yaml.Node, path: PathKey, depth: int) -> dict[str, Any]:
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        merged: dict[str, Any] = {}
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                self.fail("'<<' merges only mappings", source, path)
                continue
            for key, value in self._mapping(source, path, depth + 1).items():
                merged.setdefault(key, value)
        return merged


class _LimitExceeded(Exception):
    def __init__(self, message: str, node: yaml.Node) -> None:
        super().__init__(message)
        self.node = node


def path_text(path: PathKey) -> str:
    """('merges', 'style-mix', 'method') -> 'merges.style-mix.method'; indices as [i]."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_yaml(text: str, file: str, limits: Limits = LIMITS) -> YamlDocument:
    """Recipe text -> :class:`YamlDocument`; raises :class:`RecipeSyntaxError` with every problem."""
    if len(text.encode("utf-8", "surrogatepass")) > limits.max_bytes:
        raise RecipeSyntaxError(
            f"{file}: recipe is larger than max_bytes={limits.max_bytes}",
            [
                Problem(
                    f"recipe is larger than {limits.max_bytes} bytes (limit: max_bytes)",
                    span=SourceSpan(file, 1, 1),
                )
            ],
        )
    if len(_TEXTS) >= _KEPT_TEXTS:
        _TEXTS.pop(next(iter(_TEXTS)))
    _TEXTS[file] = text
    try:
        node = yaml.compose(text, Loader=_ComposeOnlyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = f"invalid YAML: {exc.problem or exc.context}"
        raise RecipeSyntaxError(message, [Problem(message, span=_mark_span(file, mark))]) from None
    except yaml.YAMLError as exc:
        raise RecipeSyntaxError(
            f"invalid YAML: {exc}", [Problem(f"invalid YAML: {exc}", span=SourceSpan(file, 1, 1))]
        ) from None
    except RecursionError:
        message = f"nesting too deep to parse (limit: max_depth={limits.max_depth})"
        raise RecipeSyntaxError(message, [Problem(message, span=SourceSpan(file, 1, 1))]) from None
    if node is None:
        message = "the recipe is empty"
        raise RecipeSyntaxError(
            message, [Problem(message, span=SourceSpan(file, 1, 1), hint="start from recipes/demo.yaml")]
        )
    converter = _Converter(file, limits)
    try:
        data = converter.convert(node, (), 0)
    except _LimitExceeded as exc:
        message = str(exc)
        raise RecipeSyntaxError(message, [Problem(message, span=_span(file, exc.node))]) from None
    except RecursionError:
        message = f"nesting too deep (limit: max_depth={limits.max_depth})"
        raise RecipeSyntaxError(message, [Problem(message, span=SourceSpan(file, 1, 1))]) from None
    if converter.problems:
        raise RecipeSyntaxError(converter.problems[0].message, converter.problems)
    if not isinstance(data, dict):
        message = f"a recipe must be a mapping of keys to values, not a {type(data).__name__}"
        raise RecipeSyntaxError(message, [Problem(message, span=_span(file, node))])
    return YamlDocument(file=file, text=text, data=data, positions=converter.positions)


#: Recipe texts read so far, by display name: error snippets quote only these (never a file read
#: again from disk, which could be another file by then, or one that is not a recipe).
_TEXTS: dict[str, str] = {}
_KEPT_TEXTS = 64


def recipe_text(display: str) -> str | None:
    """The text of a recipe this process read under ``display``, for error snippets; else None."""
    return _TEXTS.get(display)


def _refuse(display: str, message: str) -> RecipeSyntaxError:
    return RecipeSyntaxError(f"{display}: {message}", [Problem(f"{display}: {message}")])


def _check_recipe_path(path: Path, display: str) -> None:
    """A recipe is a regular file inside its own folder: a symlink out of it (to a secret, to
    ``/proc/self/environ``, to a device) is refused before anything is read, so no error snippet
    can show its content."""
    real = Path(os.path.realpath(path))
    folder = Path(os.path.realpath(path.parent))
    if real.is_dir():
        raise _refuse(display, "is a directory, not a recipe file")
    system = any(real == p or p in real.parents for p in (Path("/proc"), Path("/dev"), Path("/sys")))
    if system or folder not in real.parents:
        raise _refuse(display, f"is a symlink to {real}, outside the recipe's folder; refusing to read it")
    try:
        regular = stat.S_ISREG(os.stat(real).st_mode)
    except OSError:
        return  # missing or unreadable: reported by the read below
    if not regular:
        raise _refuse(display, "is not a regular file")


def read_text(path: Path, display: str, limits: Limits = LIMITS) -> str:
    """Read a recipe file as UTF-8 text, turning every I/O or decoding failure into a located error."""
    _check_recipe_path(path, display)
    try:
        with path.open("rb") as handle:
            raw = handle.read(limits.max_bytes + 1)
    except OSError as exc:
        message = f"cannot read {display}: {exc.strerror or exc}"
        raise RecipeSyntaxError(message, [Problem(message)]) from None
    if len(raw) > limits.max_bytes:
        message = f"recipe is larger than {limits.max_bytes} bytes (limit: max_bytes)"
        raise RecipeSyntaxError(message, [Problem(message, span=SourceSpan(display, 1, 1))])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        message = (
            f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); is this a binary file?"
        )
        raise RecipeSyntaxError(message, [Problem(message, span=SourceSpan(display, line, col))]) from None
    return text


def load_yaml(path: Path, display: str | None = None, limits: Limits = LIMITS) -> YamlDocument:
    """Recipe file -> :class:`YamlDocument`."""
    shown = display or str(path)
    return parse_yaml(read_text(path, shown, limits), shown, limits)
