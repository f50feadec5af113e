"""The JSON Schema accepts exactly what the loader accepts before templating (checked with jsonschema).

``schemas/recipe.schema.json`` is what editors and ``check-jsonschema`` validate recipes with, so a
recipe the loader builds must pass it (``builtin:NAME`` sources, ``"{{ w }}"`` where numbers,
booleans or enum values go), and a typo the loader refuses must fail it. Recipes are read with the
loader's own YAML 1.2 reader (``1e-4`` is a float), not PyYAML's 1.1 rules.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from jsonschema import Draft202012Validator

from lorarecipe.errors import LorarecipeError
from lorarecipe.recipe.load import parse_recipe
from lorarecipe.recipe.yaml_source import parse_yaml
from tests.helpers.fuzzing import mutated
from tests.helpers.recipes import DEMO_LIKE
from tests.test_merge_methods import CASES, one_merge_recipe

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "schemas" / "recipe.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA)


def _recipe(module: str, name: str, fields: dict[str, Any] | None) -> str:
    text: str = getattr(importlib.import_module(f"tests.{module}"), name)
    return text.format(**fields) if fields is not None else text


# module-level recipes of the test suite (those the loader accepts as they are)
TEST_RECIPES = {
    f"{module}.{name}": _recipe(module, name, fields)
    for module, name, fields in [
        ("test_cli", "MERGE_ONLY", None),
        ("test_crash_safety", "RECIPE", None),
        ("test_crash_safety", "LORA_ONLY", None),
        ("test_grids_cards", "RECIPE", None),
        ("test_hostile_inputs", "RECIPE", None),
        ("test_hub_offline", "RECIPE", None),
        ("test_incremental", "RECIPE", None),
        ("test_lock", "RECIPE", None),
        ("test_publish", "RECIPE", {"weight": 0.7}),
        ("test_runner_outputs", "RECIPE", None),
        (
            "test_streaming_factors",
            "RECIPE",
            {
                "base": "tiny-sdxl",
                "merge": "",
                "mix": "a: 0.8, b: -0.5",
                "scale": "0.7",
                "single": "",
                "fuse": "",
            },
        ),
    ]
}

TEMPLATED = """\
variables: {w: 0.7, method: ties, size: 64, full: false, steps: 3, layout: kohya, seed: 7}
matrix: {d: [0.3, 0.5]}
base: {builtin: tiny-sd, dtype: "{{ 'float32' }}"}
adapters:
  style: builtin:tiny-sd/style
  detail: {builtin: tiny-sd/detail, format: "{{ 'auto' }}"}
merges:
  m:
    method: "{{ method }}_svd"
    adapters: {style: "{{ w }}", detail: "{{ 1 - w }}"}
    density: "{{ d }}"
    svd_full_matrices: "{{ full }}"
    majority_sign_method: "{# sign #}total"
    seed: "{{ seed }}"
set_adapters:
  adapters: {style: "{{ w }}", detail: {unet: {down: "{{ w }}", up: {block_1: ["{{ w }}", 1.0]}}}}
fuse: {lora_scale: "{{ w * 2 }}", components: ["{{ 'unet' }}"]}
outputs:
  lora: {kind: lora, adapter: m, path: "lora-{{ d }}", layout: "{{ layout }}"}
  grid: {kind: grid, path: g.png, prompts: [a cat], seeds: ["{{ seed }}"], steps: "{{ steps }}",
         size: "{{ size }}", variants: [base, mix]}
"""


def readme_recipe() -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"## A recipe\n\n```yaml\n(.*?)```", text, re.S).group(1)  # type: ignore[union-attr]


def errors(text: str) -> list[str]:
    data = parse_yaml(text, "recipe.yaml").data
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(data)]


def valid_recipes() -> dict[str, str]:
    recipes = {p.name: p.read_text() for p in sorted((REPO / "recipes").glob("*.yaml"))}
    recipes.update({"DEMO_LIKE": DEMO_LIKE, "README": readme_recipe(), "templated": TEMPLATED})
    recipes.update(TEST_RECIPES)
    recipes.update({f"merge-{case.id}": one_merge_recipe(case) for case in CASES})
    return recipes


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize(("name", "text"), list(valid_recipes().items()), ids=list(valid_recipes()))
def test_every_recipe_the_loader_accepts_passes_the_schema(name: str, text: str) -> None:
    parse_recipe(text, "recipe.yaml")  # the loader accepts it (before any file is looked at)
    assert errors(text) == [], name


TYPOS = [
    ("outputs:", "outptus:"),  # a top-level key
    ("    method: cat", "    methd: cat"),  # a merge's key
    ("  lora_scale: 1.0", "  lora_scal: 1.0"),  # fuse
    ("  fused: {kind: pipeline, path: fused}", "  fused: {kind: pipeline, path: fused, dtyp: float16}"),
    ("  detail: {builtin: tiny-sd/detail,", "  detail: {bultin: tiny-sd/detail,"),
    ("  style: builtin:tiny-sd/style", "  style: builtin:tiny-sd/stlye"),  # an unknown builtin
    ("    method: cat", "    method: lnear"),  # an enum value
    ("  lora_scale: 1.0", "  lora_scale: high"),  # a string where a number goes (no template)
]


@pytest.mark.parametrize(("old", "new"), TYPOS, ids=[new.strip() for _, new in TYPOS])
def test_a_typo_fails_the_schema_and_the_loader(old: str, new: str) -> None:
    assert old in DEMO_LIKE
    text = DEMO_LIKE.replace(old, new)
    with pytest.raises(LorarecipeError):
        parse_recipe(text, "recipe.yaml")
    assert errors(text), new


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutated())
def test_mutated_recipes_the_loader_accepts_pass_the_schema(text: str) -> None:
    """Property: nothing the loader accepts is refused by the schema (the schema cannot express the
    cross-field rules, so the converse is checked on the typos above)."""
    try:
        parse_recipe(text, "recipe.yaml")
    except LorarecipeError:
        return
    assert errors(text) == []
