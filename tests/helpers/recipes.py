"""Builders for recipe files in tests."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from lorarecipe.compiler import compile_recipe
from lorarecipe.errors import LorarecipeError, Problem
from lorarecipe.plan import Plan
from lorarecipe.recipe.load import load_recipe

if TYPE_CHECKING:
    from lorarecipe.runner import BuildResult

DEMO_LIKE = """\
base: builtin:tiny-sd
adapters:
  style: builtin:tiny-sd/style
  detail: {builtin: tiny-sd/detail, trigger_words: [fine detail]}
merges:
  both:
    method: cat
    adapters: {style: 1.0, detail: 0.5}
set_adapters:
  adapters: {style: 0.7, detail: 0.5}
fuse:
  lora_scale: 1.0
outputs:
  fused: {kind: pipeline, path: fused}
  lora: {kind: lora, adapter: both, path: lora}
"""


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def compile_text(folder: Path, text: str, **kwargs: object) -> Plan:
    loaded = load_recipe(write_recipe(folder, text))
    return compile_recipe(loaded, **kwargs)  # type: ignore[arg-type]


def problems_of(folder: Path, text: str, **kwargs: object) -> list[Problem]:
    try:
        compile_text(folder, text, **kwargs)
    except LorarecipeError as exc:
        return exc.problems
    raise AssertionError("expected the recipe to be refused")


def messages(problems: list[Problem]) -> list[str]:
    return [f"{p.path}: {p.message}" + (f" [{p.hint}]" if p.hint else "") for p in problems]


def build_text(
    folder: Path,
    text: str,
    out: str = "out",
    name: str = "recipe.yaml",
    allow_read: tuple[Path, ...] = (),
    executor: str = "auto",
) -> BuildResult:
    """Write, load, compile and run a recipe; returns the runner's result."""
    from lorarecipe.runner import run_plan

    loaded = load_recipe(write_recipe(folder, text, name))
    plan = compile_recipe(loaded, allow_read=allow_read)
    return run_plan(
        plan,
        out_root=folder / out,
        recipe_root=loaded.root,
        recipe_text=loaded.text,
        allow_read=allow_read,
        executor=executor,
    )
