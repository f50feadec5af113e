"""The recipe JSON Schema, generated from the pydantic models (``schemas/recipe.schema.json``).

Editors use it through the ``# yaml-language-server: $schema=`` header of each recipe; a test keeps
the checked-in file equal to this output.
"""

from __future__ import annotations

import json
from typing import Any

from .models import Recipe

__all__ = ["SCHEMA_ID", "recipe_schema", "recipe_schema_text"]

SCHEMA_ID = "https://lorarecipe.dev/schemas/recipe.schema.json"


def recipe_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "lorarecipe recipe",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def recipe_schema_text() -> str:
    return json.dumps(recipe_schema(), indent=2, sort_keys=True) + "\n"
