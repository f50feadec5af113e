"""lorarecipe: a declarative, YAML-driven merge-recipe compiler for diffusion-model LoRAs.

YAML text --load_recipe--> Recipe builds --compile_recipe--> Plan --run_plan--> outputs + manifest.
Importing the package is light: torch, diffusers and peft are only imported by the runner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    BuildError,
    ExecutorRefusal,
    InputUnavailableError,
    IntegrityError,
    InternalError,
    LockError,
    LorarecipeError,
    Problem,
    RecipeCompileError,
    RecipeError,
    RecipeSyntaxError,
    RecipeValidationError,
    StepFailedError,
    StreamingUnsupported,
    UnsafeInputError,
    UsageError,
)

__version__ = "0.1.0"

__all__ = [
    "BuildError",
    "ExecutorRefusal",
    "InputUnavailableError",
    "IntegrityError",
    "InternalError",
    "LockError",
    "LorarecipeError",
    "Problem",
    "RecipeCompileError",
    "RecipeError",
    "RecipeSyntaxError",
    "RecipeValidationError",
    "StepFailedError",
    "StreamingUnsupported",
    "UnsafeInputError",
    "UsageError",
    "__version__",
    "compile_recipe",
    "load_recipe",
    "run_plan",
]

if TYPE_CHECKING:
    from .compiler import compile_recipe
    from .recipe.load import load_recipe
    from .runner import run_plan


def __getattr__(name: str) -> Any:
    """Lazy entry points, so ``import lorarecipe`` stays cheap."""
    if name == "load_recipe":
        from .recipe.load import load_recipe

        return load_recipe
    if name == "compile_recipe":
        from .compiler import compile_recipe

        return compile_recipe
    if name == "run_plan":
        from .runner import run_plan

        return run_plan
    raise AttributeError(name)
