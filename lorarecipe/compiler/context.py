"""Shared state of one compilation: the recipe, its positions, and the problems found so far.

Checks append located problems here instead of raising, so a user sees every problem in a file
at once; ``compile_recipe`` raises one ``RecipeCompileError`` at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Problem
from ..plan import Check, Origin
from ..recipe.load import LoadedRecipe, RecipeBuild, path_text
from ..recipe.yaml_source import PathKey

__all__ = ["CompileContext"]


@dataclass
class CompileContext:
    loaded: LoadedRecipe
    build: RecipeBuild
    allow_read: Sequence[Path] = ()
    problems: list[Problem] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    #: static facts gathered from headers, by subject ("base", "adapters.<name>")
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def recipe(self) -> Any:
        return self.build.recipe

    @property
    def root(self) -> Path:
        return self.loaded.root

    def error(self, path: PathKey, message: str, hint: str | None = None, *, on_key: bool = False) -> None:
        positions = self.loaded.positions
        span = positions.key(path) if on_key else positions.value(path)
        problem = Problem(message, path_text(path), span, hint)
        if problem not in self.problems:
            self.problems.append(problem)

    def warn(self, path: PathKey, message: str, hint: str | None = None) -> None:
        problem = Problem(
            message, path_text(path), self.loaded.positions.value(path), hint, severity="warning"
        )
        if problem not in self.problems:
            self.problems.append(problem)

    def origin(self, path: PathKey) -> Origin:
        span = self.loaded.positions.key(path)
        line, col = (span.line, span.col) if span else (1, 1)
        return Origin(path_text(path), self.loaded.display, line, col)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]
