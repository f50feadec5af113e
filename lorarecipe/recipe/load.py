"""Recipe file -> one validated :class:`~lorarecipe.recipe.Recipe` per build.

``load_recipe(path, overrides)`` parses the YAML with positions (``loader``), applies ``--set``
overrides, expands the ``matrix`` into builds, renders ``{{ }}`` templates in the sandbox
(``templating``) and validates each build with pydantic, mapping every pydantic error back to
``file:line:col`` and a recipe path. All problems of a file are reported together. Pure: it never
mutates its inputs and never imports torch.
"""

from __future__ import annotations

import itertools
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..diagnostics import did_you_mean
from ..errors import Problem, RecipeValidationError, UsageError
from .models import NAME_PATTERN, Recipe
from .yaml_source import (
    LIMITS,
    Limits,
    PathKey,
    PositionMap,
    YamlDocument,
    load_yaml,
    parse_yaml,
    resolve_plain_scalar,
)

__all__ = [
    "MAX_BUILDS",
    "LoadedRecipe",
    "RecipeBuild",
    "find_recipe_files",
    "load_recipe",
    "parse_overrides",
    "parse_recipe",
    "path_text",
]

MAX_BUILDS = 256
_UNTEMPLATED = ("variables", "matrix")


@dataclass(frozen=True)
class RecipeBuild:
    """One build of a recipe: a matrix combination (label '' when there is no matrix)."""

    label: str
    variables: tuple[tuple[str, Any], ...]
    recipe: Recipe


@dataclass(frozen=True)
class LoadedRecipe:
    """A recipe file, validated: its text and positions, and its builds."""

    path: Path
    display: str
    document: YamlDocument
    builds: tuple[RecipeBuild, ...]
    name: str

    @property
    def root(self) -> Path:
        """The recipe's folder: local inputs resolve inside it."""
        return self.path.resolve().parent

    @property
    def text(self) -> str:
        return self.document.text

    @property
    def positions(self) -> PositionMap:
        return self.document.positions


def path_text(path: PathKey) -> str:
    """('merges', 'style-mix', 'method') -> 'merges.style-mix.method'; indices as [i]."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _scalar_ok(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) and not (isinstance(value, float) and math.isnan(value))


def _variables(doc: YamlDocument, overrides: dict[str, str]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Declared variables (with --set applied) and matrix axes; problems for non-scalars."""
    data = doc.data
    declared = data.get("variables") if isinstance(data.get("variables"), dict) else {}
    matrix = data.get("matrix") if isinstance(data.get("matrix"), dict) else {}
    problems: list[Problem] = []
    values: dict[str, Any] = {}
    for name, value in declared.items():
        if _scalar_ok(value):
            values[name] = value
        else:
            problems.append(
                Problem(
                    "a variable must be a string, number or boolean",
                    f"variables.{name}",
                    doc.positions.value(("variables", name)),
                )
            )
    axes: dict[str, list[Any]] = {}
    for name, value in matrix.items():
        if isinstance(value, list) and value and all(_scalar_ok(v) for v in value):
            axes[name] = value
        else:
            problems.append(
                Problem(
                    "a matrix axis must be a non-empty list of scalars",
                    f"matrix.{name}",
                    doc.positions.value(("matrix", name)),
                )
            )
    if problems:
        raise RecipeValidationError(problems[0].message, problems)
    for name, raw in overrides.items():
        if name not in values and name not in axes:
            hint = did_you_mean(name, [*values, *axes]) or (
                f"declared variables: {', '.join([*values, *axes])}"
                if values or axes
                else "the recipe declares no variables"
            )
            raise UsageError(f"--set {name}: the recipe has no variable {name!r} ({hint})")
        parsed = resolve_plain_scalar(raw)
        if parsed is None:
            parsed = raw
        if name in axes:
            axes[name] = [parsed]
        else:
            values[name] = parsed
    return values, axes


def _label(combo: dict[str, Any]) -> str:
    parts = [f"{k}-{v}" for k, v in combo.items()]
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "_".join(parts))[:120]


def _untemplated(path: PathKey, key: object) -> bool:
    """Keys rendered elsewhere: ``variables``/``matrix`` (they are the values), and each output's
    ``publish`` (the compiler renders it with ``name``, ``build`` and ``output`` too)."""
    if not path:
        return key in _UNTEMPLATED
    return len(path) == 2 and path[0] == "outputs" and key == "publish"


def _render_tree(
    data: Any, variables: dict[str, Any], path: PathKey, doc: YamlDocument, problems: list[Problem]
) -> Any:
    if isinstance(data, dict):
        return {
            k: (v if _untemplated(path, k) else _render_tree(v, variables, (*path, k), doc, problems))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_render_tree(v, variables, (*path, i), doc, problems) for i, v in enumerate(data)]
    if isinstance(data, str) and any(marker in data for marker in ("{{", "{%", "{#")):
        from .templating import TemplateProblem, render_scalar  # jinja2 only when a recipe uses templates

        try:
            return render_scalar(data, variables)
        except TemplateProblem as exc:
            problems.append(
                Problem(
                    str(exc),
                    path_text(path),
                    doc.positions.value(path),
                    did_you_mean_var(str(exc), variables),
                )
            )
            return data
    return data


def did_you_mean_var(message: str, variables: dict[str, Any]) -> str | None:
    match = re.search(r"'(\w+)' is undefined", message)
    if match:
        return did_you_mean(match.group(1), variables) or "declare it under 'variables'"
    return None


def load_recipe(
    path: Path | str,
    overrides: dict[str, str] | None = None,
    limits: Limits = LIMITS,
    display: str | None = None,
) -> LoadedRecipe:
    """Recipe file (+ ``--set`` overrides) -> :class:`LoadedRecipe`; raises ``RecipeError``/``UsageError``."""
    path = Path(path)
    shown = display or _display_path(path)
    return _load_document(load_yaml(path, shown, limits), path, shown, overrides)


def _load_document(
    doc: YamlDocument, path: Path, shown: str, overrides: dict[str, str] | None
) -> LoadedRecipe:
    values, axes = _variables(doc, dict(overrides or {}))
    count = math.prod(len(v) for v in axes.values()) if axes else 1
    if count > MAX_BUILDS:
        raise RecipeValidationError(
            f"the matrix expands to {count} builds (limit: MAX_BUILDS={MAX_BUILDS})",
            [
                Problem(
                    f"the matrix expands to {count} builds, more than the limit of {MAX_BUILDS}",
                    "matrix",
                    doc.positions.key(("matrix",)),
                    "split the sweep into several recipes",
                )
            ],
        )
    builds: list[RecipeBuild] = []
    problems: list[Problem] = []
    for combo_values in itertools.product(*axes.values()) if axes else [()]:
        combo = dict(zip(axes, combo_values, strict=True))
        variables = {**values, **combo}
        build_problems: list[Problem] = []
        data = _render_tree(doc.data, variables, (), doc, build_problems)
        recipe = None
        if not build_problems:
            try:
                recipe = Recipe.model_validate(data)
            except ValidationError as exc:
                build_problems.extend(pydantic_problems(exc, data, doc))
            except RecursionError:
                build_problems.append(Problem("recipe nesting too deep", span=doc.positions.value(())))
        for problem in build_problems:
            if problem not in problems:
                problems.append(problem)
        if recipe is not None:
            builds.append(RecipeBuild(_label(combo), tuple(variables.items()), recipe))
    if problems:
        raise RecipeValidationError(problems[0].message, problems)
    first = builds[0].recipe
    name = first.name or _name_from_stem(path.stem)
    return LoadedRecipe(path=path, display=shown, document=doc, builds=tuple(builds), name=name)


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _name_from_stem(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-_")[:64] or "recipe"
    return name if re.match(NAME_PATTERN, name) else f"r{name}"[:64]


# --- pydantic errors -> located problems -------------------------------------------------------


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


def parse_recipe(
    text: str, file: str = "recipe.yaml", overrides: dict[str, str] | None = None, limits: Limits = LIMITS
) -> LoadedRecipe:
    """Recipe text held in memory -> :class:`LoadedRecipe` (tests, fuzzing, stdin)."""
    return _load_document(parse_yaml(text, file, limits), Path(file), file, overrides)


def parse_overrides(values: Sequence[str] | None) -> dict[str, str]:
    """``--set name=value`` arguments -> {name: value} (values are parsed like YAML scalars later)."""
    out: dict[str, str] = {}
    for item in values or []:
        if "=" not in item:
            raise UsageError(f"--set expects name=value, got {item!r}")
        name, value = item.split("=", 1)
        out[name.strip()] = value
    return out


def find_recipe_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files and folders -> recipe files: a folder gives its ``.yaml``/``.yml`` files, recursively and
    sorted, skipping hidden files and folders."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix in (".yaml", ".yml")
                and (p.is_file() or p.is_symlink())  # a symlink is reported when read, never skipped
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            files.extend(found)
        else:
            files.append(path)
    return files
