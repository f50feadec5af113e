"""Recipe file -> one validated :class:`~lorarecipe.recipe.Recipe` per build.

``load_recipe(path, overrides)`` parses the YAML with positions (``loader``), applies ``--set``
overrides, expands the ``matrix`` into builds, renders ``{{ }}`` templates in the sandbox
(``templating``) and validates each build with pydantic, mapping every pydantic error back to
``file:line:col`` and a recipe path. All problems of a file are reported together. Pure: it never
mutates its inputs and never imports torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..diagnostics import did_you_mean
from ..errors import MAX_PROBLEMS, Problem, RecipeValidationError, UsageError
from .fields import NAME_PATTERN
from .matrix import build_label, combinations, duplicate_values
from .models import Recipe
from .pydantic_errors import pydantic_problems
from .yaml_source import (
    LIMITS,
    Limits,
    PathKey,
    PositionMap,
    YamlDocument,
    load_yaml,
    parse_yaml,
    path_text,
    resolve_plain_scalar,
)

__all__ = [
    "MAX_BUILDS",
    "MAX_NODE_BUILDS",
    "LoadedRecipe",
    "RecipeBuild",
    "find_recipe_files",
    "load_recipe",
    "parse_overrides",
    "parse_recipe",
    "path_text",
]

MAX_BUILDS = 256
#: Document nodes times builds: what loading a recipe may walk (an alias-expanded list x a big matrix).
MAX_NODE_BUILDS = 250_000
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


def _untemplated(path: PathKey, key: object) -> bool:
    """Keys rendered elsewhere: ``variables``/``matrix`` (they are the values), and each output's
    ``publish`` (the compiler renders it with ``name``, ``build`` and ``output`` too)."""
    if not path:
        return key in _UNTEMPLATED
    return len(path) == 2 and path[0] == "outputs" and key == "publish"


class _Renderer:
    """Renders the ``{{ }}`` strings of one build; a string repeated (YAML aliases) renders once, and
    every render of the file shares one template :class:`~lorarecipe.recipe.templating.Budget`."""

    def __init__(self, doc: YamlDocument, variables: dict[str, Any], budget: Any) -> None:
        self.doc, self.variables, self.budget = doc, variables, budget
        self.done: dict[str, tuple[object, str | None]] = {}
        self.problems: list[Problem] = []

    def tree(self, data: Any, path: PathKey) -> Any:
        if isinstance(data, dict):
            return {k: v if _untemplated(path, k) else self.tree(v, (*path, k)) for k, v in data.items()}
        if isinstance(data, list):
            return [self.tree(v, (*path, i)) for i, v in enumerate(data)]
        if isinstance(data, str) and any(marker in data for marker in ("{{", "{%", "{#")):
            if data not in self.done:
                self.done[data] = self._render(data)
            value, error = self.done[data]
            if error is not None:
                hint = did_you_mean_var(error, self.variables)
                self.problems.append(Problem(error, path_text(path), self.doc.positions.value(path), hint))
            return value
        return data

    def _render(self, text: str) -> tuple[object, str | None]:
        from .templating import TemplateProblem, render_scalar  # jinja2 only when a recipe uses templates

        try:
            return render_scalar(text, self.variables, self.budget), None
        except TemplateProblem as exc:
            return text, str(exc)


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
    _check_work(doc, axes, count)
    from .template_limits import Budget  # torch-free and tiny; jinja2 itself loads only on a template

    budget = Budget()
    builds: list[RecipeBuild] = []
    problems: dict[Problem, None] = dict.fromkeys(duplicate_values(axes, doc.positions))
    for combo in combinations(axes) if not problems else ():
        variables = {**values, **combo}
        renderer = _Renderer(doc, variables, budget)
        data = renderer.tree(doc.data, ())
        recipe = None
        if not renderer.problems:
            try:
                recipe = Recipe.model_validate(data)
            except ValidationError as exc:
                renderer.problems.extend(pydantic_problems(exc, data, doc))
            except RecursionError:
                renderer.problems.append(Problem("recipe nesting too deep", span=doc.positions.value(())))
        problems.update(dict.fromkeys(renderer.problems))
        if recipe is not None:
            builds.append(RecipeBuild(build_label(combo), tuple(variables.items()), recipe))
        if len(problems) > MAX_PROBLEMS:
            break  # enough to act on; the rest of the matrix would only repeat them
    if problems:
        found = list(problems)
        raise RecipeValidationError(found[0].message, found)
    first = builds[0].recipe
    name = first.name or _name_from_stem(path.stem)
    return LoadedRecipe(path=path, display=shown, document=doc, builds=tuple(builds), name=name)


def _check_work(doc: YamlDocument, axes: dict[str, list[Any]], builds: int) -> None:
    """Every build walks the whole document: a large (alias-expanded) document times a large matrix is
    refused before the walk, located at the matrix."""
    nodes = len(doc.positions.values)
    if nodes * builds > MAX_NODE_BUILDS:
        message = (
            f"the matrix repeats a {nodes}-node recipe {builds} times: more than {MAX_NODE_BUILDS} nodes "
            "to render and check (limit: MAX_NODE_BUILDS)"
        )
        raise RecipeValidationError(
            message, [Problem(message, "matrix", doc.positions.key(("matrix",)), "split the sweep")]
        )


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _name_from_stem(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-_")[:64] or "recipe"
    return name if re.match(NAME_PATTERN, name) else f"r{name}"[:64]


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
