"""Hypothesis strategies for hostile recipes, shared by the tests and ``fuzz/run.py``."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import strategies as st

from lorarecipe.compiler import compile_recipe
from lorarecipe.errors import LorarecipeError
from lorarecipe.recipe.load import parse_recipe
from tests.helpers.recipes import DEMO_LIKE

SEEDS = [DEMO_LIKE, *(p.read_text() for p in sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml")))]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "cat",
            "linear",
            "builtin:tiny-sd",
            "../x",
            "/etc/passwd",
            "{{ x }}",
            "tiny-sd/style",
            "pipeline",
            "grid",
            "lora",
            "-1e309",
            "0x10",
        ]
    ),
)
_keys = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "base",
            "adapters",
            "merges",
            "set_adapters",
            "fuse",
            "outputs",
            "method",
            "weights",
            "density",
            "kind",
            "path",
            "builtin",
            "file",
            "hub",
            "variables",
            "matrix",
            "lora_scale",
            "variants",
            "prompts",
        ]
    ),
)
structured = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=30,
)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["delete", "insert", "dupline", "swap", "truncate", "replace"]))
        if not text:
            break
        i = draw(st.integers(0, len(text) - 1))
        if op == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 30)) :]
        elif op == "insert":
            text = text[:i] + draw(st.text(max_size=10)) + text[i:]
        elif op == "truncate":
            text = text[:i]
        elif op in ("dupline", "swap"):
            lines = text.splitlines(keepends=True)
            a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if op == "dupline":
                lines.insert(a, lines[b])
            else:
                lines[a], lines[b] = lines[b], lines[a]
            text = "".join(lines)
        else:
            token = draw(
                st.sampled_from(
                    [
                        "*a",
                        "&a x",
                        "!!python/none",
                        "[",
                        "{",
                        "'",
                        '"',
                        ": :",
                        "- -",
                        "\t",
                        "\x00",
                        "<<: *x",
                        "{{ ''.__class__ }}",
                        "1e999",
                        "~",
                    ]
                )
            )
            text = text[:i] + token + text[i + draw(st.integers(0, 5)) :]
    return text


recipes_text = st.one_of(
    mutated(), structured.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text()
)


def check_recipe_never_crashes(text: str, folder: Path) -> str:
    """Load + compile every build; only lorarecipe errors (with a message) are acceptable."""
    try:
        loaded = parse_recipe(text, str(folder / "fuzz.yaml"))
        for build in loaded.builds:
            compile_recipe(loaded, build)
    except LorarecipeError as exc:
        assert exc.problems and all(p.message for p in exc.problems)
        return "error"
    return "ok"
