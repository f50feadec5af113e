"""The recipe JSON Schema, generated from the pydantic models (``schemas/recipe.schema.json``).

Editors and CI (``check-jsonschema``) use it through the ``# yaml-language-server: $schema=`` header
of each recipe; a test keeps the checked-in file equal to this output. It describes the file *as
written*, before the loader's two rewrites, so it accepts exactly what the loader accepts:

- a ``{{ … }}`` / ``{% … %}`` / ``{# … #}`` template is rendered to a scalar before validation, so
  wherever a number, a boolean, an enum value or a constrained string goes, a string holding a
  template is accepted too (``#/$defs/Template``; never where a list or mapping goes, never as a key);
- a base or adapter source may be written ``builtin:NAME`` instead of a mapping.

The pydantic models are the single source of the rules; this module only adds those two rewrites.
"""

from __future__ import annotations

import json
from typing import Any

from ..builtin.catalog import BUILTIN_BASES, BUILTIN_LORAS
from .models import Recipe

__all__ = ["SCHEMA_ID", "TEMPLATE_PATTERN", "recipe_schema", "recipe_schema_text"]

SCHEMA_ID = "https://lorarecipe.dev/schemas/recipe.schema.json"
TEMPLATE_PATTERN = r"\{\{|\{%|\{#"  # the markers the loader renders (recipe.load._render_tree)
TEMPLATE_REF = {"$ref": "#/$defs/Template"}
TEMPLATE = {
    "type": "string",
    "pattern": TEMPLATE_PATTERN,
    "description": "A jinja2 template rendered with the recipe's variables before validation, e.g. "
    "'{{ w }}'; its result must fit here.",
}
_SCALAR_TYPES = ("number", "integer", "boolean")
_STRING_CONSTRAINTS = ("pattern", "enum", "const", "format", "minLength", "maxLength")
_META = ("description", "default", "title")


def _constrained_scalar(schema: dict[str, Any]) -> bool:
    """A leaf that a template string would not already satisfy: a number, boolean or enum value, or
    a string with a pattern/length/format."""
    if any(k in schema for k in ("$ref", "anyOf", "oneOf", "allOf")):
        return False
    kind = schema.get("type")
    if kind in _SCALAR_TYPES or "enum" in schema or "const" in schema:
        return True
    return kind == "string" and any(k in schema for k in _STRING_CONSTRAINTS)


def _accept_templates(schema: dict[str, Any], wrap: bool = True) -> dict[str, Any]:
    """Every constrained scalar position also takes a template string (recursively; ``oneOf`` becomes
    ``anyOf``, since a template may match several branches; property names are left alone)."""
    node = dict(schema)
    for key in ("properties", "$defs", "patternProperties"):
        if key in node:
            node[key] = {name: _accept_templates(sub) for name, sub in node[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = _accept_templates(node[key])
    for key in ("prefixItems", "allOf"):
        if key in node:
            node[key] = [_accept_templates(sub) for sub in node[key]]
    for key in ("anyOf", "oneOf"):
        if key in node:
            members = node.pop(key)
            branches = [_accept_templates(sub, wrap=False) for sub in members]
            if any(_constrained_scalar(sub) for sub in members):
                branches.append(TEMPLATE_REF)
            node["anyOf"] = branches
            node.pop("discriminator", None)
    if wrap and _constrained_scalar(schema):
        meta = {k: node.pop(k) for k in _META if k in node}
        return {"anyOf": [node, TEMPLATE_REF], **meta}
    return node


def _shorthand(defs: dict[str, Any], name: str, builtins: Any, what: str) -> None:
    """A source def also takes ``builtin:NAME`` (the loader's ``_builtin_shorthand``)."""
    mapping = defs[name]
    meta = {k: mapping.pop(k) for k in ("description", "title") if k in mapping}
    names = sorted(f"builtin:{n}" for n in builtins)
    short = {
        "type": "string",
        "enum": names,
        "description": f"Short for {{builtin: NAME}}: a built-in {what}.",
    }
    defs[name] = {"anyOf": [mapping, {"anyOf": [short, TEMPLATE_REF]}], **meta}


def recipe_schema() -> dict[str, Any]:
    schema = _accept_templates(Recipe.model_json_schema(mode="validation"))
    defs = schema.setdefault("$defs", {})
    _shorthand(defs, "BaseSpec", BUILTIN_BASES, "tiny pipeline")
    _shorthand(defs, "AdapterSpec", BUILTIN_LORAS, "tiny LoRA")
    defs["Template"] = TEMPLATE
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "lorarecipe recipe",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def recipe_schema_text() -> str:
    return json.dumps(recipe_schema(), indent=2, sort_keys=True) + "\n"
