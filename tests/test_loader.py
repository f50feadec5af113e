"""YAML loader: positions, YAML 1.2 scalars, duplicate keys, tags, and resource limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorarecipe.errors import RecipeSyntaxError
from lorarecipe.recipe.yaml_source import Limits, load_yaml, parse_yaml


def test_positions_are_one_based_for_values_and_keys() -> None:
    doc = parse_yaml("base: x\nmerges:\n  mix:\n    method: lnear\n", "r.yaml")
    value = doc.positions.value(("merges", "mix", "method"))
    key = doc.positions.key(("merges", "mix", "method"))
    assert (value.line, value.col, value.end_col) == (4, 13, 18)
    assert (key.line, key.col) == (4, 5)
    # a path that does not exist falls back to its deepest existing ancestor
    assert doc.positions.value(("merges", "mix", "nope")) == doc.positions.value(("merges", "mix"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1e-4", 1e-4),
        ("1.5", 1.5),
        ("-2", -2),
        ("0x1F", 31),
        ("0o17", 15),
        (".inf", float("inf")),
        ("true", True),
        ("False", False),
        ("null", None),
        ("~", None),
        ("yes", "yes"),
        ("no", "no"),
        ("on", "on"),  # YAML 1.1 booleans stay strings (the Norway problem)
        ("2024-01-02", "2024-01-02"),  # dates stay strings
        ("'1.0'", "1.0"),
        ('"true"', "true"),  # quoted scalars are strings
        ("1_000", "1_000"),
        ("0755", 755),
    ],
)
def test_yaml_12_core_scalars(text: str, expected: object) -> None:
    assert parse_yaml(f"v: {text}\n", "r.yaml").data["v"] == expected


def test_huge_integer_literal_stays_a_string() -> None:
    assert parse_yaml("v: " + "9" * 100 + "\n", "r.yaml").data["v"] == "9" * 100


def test_duplicate_keys_are_errors_with_both_lines() -> None:
    with pytest.raises(RecipeSyntaxError) as err:
        parse_yaml("a: 1\nb: 2\na: 3\n", "r.yaml")
    problem = err.value.problems[0]
    assert "duplicate key 'a' (first defined on line 1)" in problem.message
    assert problem.span is not None and (problem.span.line, problem.span.col) == (3, 1)


def test_all_duplicate_keys_reported_at_once() -> None:
    with pytest.raises(RecipeSyntaxError) as err:
        parse_yaml("a: 1\na: 2\nb:\n  c: 1\n  c: 2\n", "r.yaml")
    assert len(err.value.problems) == 2


def test_python_tags_are_refused() -> None:
    with pytest.raises(RecipeSyntaxError) as err:
        parse_yaml("a: !!python/object/apply:os.system ['echo hi']\n", "r.yaml")
    assert "tag" in err.value.problems[0].message


def test_anchors_aliases_and_merge_keys() -> None:
    doc = parse_yaml("d: &d {x: 1, y: 2}\ne:\n  <<: *d\n  y: 3\nf: *d\n", "r.yaml")
    assert doc.data["e"] == {"x": 1, "y": 3}
    assert doc.data["f"] == {"x": 1, "y": 2}


def test_alias_bomb_is_refused_naming_the_limit() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    with pytest.raises(RecipeSyntaxError) as err:
        parse_yaml("\n".join(lines) + "\n", "bomb.yaml")
    assert "max_nodes" in err.value.problems[0].message


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(RecipeSyntaxError) as err:
        parse_yaml("a: " + "[" * 200 + "]" * 200 + "\n", "deep.yaml")
    assert "max_depth" in err.value.problems[0].message


def test_very_deep_nesting_does_not_crash_the_parser() -> None:
    with pytest.raises(RecipeSyntaxError):
        parse_yaml("a: " + "[" * 50_000 + "]" * 50_000 + "\n", "deeper.yaml", Limits(max_bytes=10**6))


def test_binary_garbage_is_located(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(b"base: x\n\xff\xfe\x00garbage")
    with pytest.raises(RecipeSyntaxError) as err:
        load_yaml(path, "x.yaml")
    problem = err.value.problems[0]
    assert "not UTF-8" in problem.message and problem.span is not None and problem.span.line == 2


def test_truncated_yaml_is_located() -> None:
    with pytest.raises(RecipeSyntaxError) as err:
        parse_yaml("a:\n  b: [1, 2\n", "t.yaml")
    assert err.value.problems[0].span is not None


def test_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeSyntaxError) as err:
        load_yaml(tmp_path, "dir")
    assert "is a directory" in err.value.problems[0].message


@pytest.mark.parametrize(
    "text", ["", "# only a comment\n", "- a\n- b\n", "just a string\n", "a: 1\n---\nb: 2\n"]
)
def test_non_mapping_documents(text: str) -> None:
    with pytest.raises(RecipeSyntaxError):
        parse_yaml(text, "r.yaml")


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("a: " + "x" * 2_000_000 + "\n")
    with pytest.raises(RecipeSyntaxError) as err:
        load_yaml(path, "big.yaml")
    assert "max_bytes" in err.value.problems[0].message
