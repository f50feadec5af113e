"""Recipe schema and loading: pydantic errors mapped to file:line:col, variables, matrix, sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorarecipe.diagnostics import render_text
from lorarecipe.errors import RecipeError, UsageError
from lorarecipe.recipe.load import MAX_BUILDS, load_recipe, parse_recipe
from tests.helpers.golden import UPDATE_ENV, assert_golden
from tests.helpers.recipes import DEMO_LIKE, write_recipe

GOLDEN = Path(__file__).parent / "golden"

BAD = """\
base: builtin:tiny-sd
adapters:
  style: {builtin: tiny-sd/style}
  detail:
    builtin: tiny-sd/detial
merges:
  style-mix:
    method: lnear
    adapters: [style, detail]
    densty: 0.5
  pruned:
    method: ties
    adapters: [style, detail]
set_adapters:
  adapters: [style, detail]
  weights: [0.7, {unet: {down: 0.5}, text_encoder: {down: 1}}]
fuse: {lora_scale: abc}
outputs:
  out: {kind: pipelin, path: x}
  g: {kind: grid, path: g.png, prompts: [a], size: 13}
"""


def _problems(text: str) -> list[str]:
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "bad.yaml")
    return [f"{p.path}: {p.message}" for p in err.value.problems]


def test_golden_error_report() -> None:
    """All problems at once, compiler-style, with snippets, carets and hints (full text pinned)."""
    with pytest.raises(RecipeError) as err:
        parse_recipe(BAD, "recipes/bad.yaml")
    text = render_text(err.value.problems, BAD) + "\n"
    assert_golden(text, GOLDEN / "bad_recipe_errors.txt")


def test_a_missing_golden_file_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A golden comparison never passes by writing its own golden file, unless asked to."""
    monkeypatch.delenv(UPDATE_ENV, raising=False)
    missing = tmp_path / "golden" / "missing.txt"
    with pytest.raises(pytest.fail.Exception, match="is missing"):
        assert_golden("text", missing)
    assert not missing.exists()
    with pytest.raises(AssertionError):
        assert_golden("text", GOLDEN / "bad_recipe_errors.txt")
    monkeypatch.setenv(UPDATE_ENV, "1")
    assert_golden("text", missing)
    assert missing.read_text() == "text"


def test_error_for_typo_in_method_names_line_col_and_hint() -> None:
    with pytest.raises(RecipeError) as err:
        parse_recipe(BAD, "recipes/x.yaml")
    method = next(p for p in err.value.problems if p.path == "merges.style-mix.method")
    assert method.message == "unknown method 'lnear'"
    assert method.hint == "did you mean 'linear'?"
    assert method.span is not None and (method.span.file, method.span.line, method.span.col) == (
        "recipes/x.yaml",
        8,
        13,
    )


def test_density_required_for_ties() -> None:
    assert (
        "merges.pruned: method 'ties' needs 'density' (the fraction of values kept, e.g. 0.5)"
        in _problems(BAD)
    )


def test_text_encoder_block_dict_is_refused_not_ignored() -> None:
    assert "set_adapters.weights[1].text_encoder: expected a number, got a mapping" in _problems(BAD)


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        (
            ("weights: [0.7, {unet: {down: 0.5}, text_encoder: {down: 1}}]", "weights: [0.7]"),
            "set_adapters: 1 weights for 2 adapters: give one weight per adapter",
        ),
        (
            (
                "weights: [0.7, {unet: {down: 0.5}, text_encoder: {down: 1}}]",
                "weights: [0.7, 0.5]\n  adapters: [a, a]",
            ),
            "set_adapters.adapters: duplicate key 'adapters' (first defined on line 15)",
        ),
        (
            ("base: builtin:tiny-sd", "base: {hub: org/x, path: y}"),
            "base: give exactly one of hub, path, file or builtin (got hub, path)",
        ),
        (
            ("base: builtin:tiny-sd", "base: {path: y, revision: main}"),
            "base: 'revision' only applies to a hub base",
        ),
        (
            ("style: {builtin: tiny-sd/style}", "style: {hub: org/lora}"),
            "adapters.style: a hub adapter needs 'weight_name': the exact .safetensors file to load",
        ),
        (
            ("fuse: {lora_scale: abc}", "fuse: {lora_scale: .inf}"),
            "fuse.lora_scale: expected a finite number, got inf",
        ),
    ],
)
def test_schema_rules(replace: tuple[str, str], expected: str) -> None:
    assert expected in _problems(BAD.replace(*replace))


def test_unknown_top_level_key_suggests_the_right_one() -> None:
    with pytest.raises(RecipeError) as err:
        parse_recipe(DEMO_LIKE + "output: {}\n", "r.yaml")
    (problem,) = err.value.problems
    assert (problem.path, problem.message, problem.hint) == (
        "output",
        "unknown key 'output'",
        "did you mean 'outputs'?",
    )


def test_variables_render_as_native_types_and_set_overrides(tmp_path: Path) -> None:
    text = "variables: {scale: 0.8, style: watercolor}\n" + DEMO_LIKE.replace(
        "lora_scale: 1.0", "lora_scale: '{{ scale }}'"
    ).replace(
        "detail: {builtin: tiny-sd/detail, trigger_words: [fine detail]}",
        "detail: {builtin: tiny-sd/detail, trigger_words: ['{{ style | upper }} style']}",
    )
    path = write_recipe(tmp_path, text)
    recipe = load_recipe(path).builds[0].recipe
    assert recipe.fuse is not None and recipe.fuse.lora_scale == 0.8
    assert recipe.adapters["detail"].trigger_words == ["WATERCOLOR style"]
    recipe = load_recipe(path, {"scale": "0.25"}).builds[0].recipe
    assert recipe.fuse is not None and recipe.fuse.lora_scale == 0.25
    with pytest.raises(UsageError, match="did you mean 'scale'"):
        load_recipe(path, {"scael": "1"})


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ self.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'].environ }}",
        "{{ range.__self__ }}",
        "{{ 'x' * 100000000 }}",
        "{{ ((9 ** 64) ** 64) ** 64 }}",
        "{% include '/etc/passwd' %}",
        "{{ undefined_variable }}",
        "{% for i in range(10) %}x{% endfor %}",
    ],
)
def test_templates_cannot_escape_the_sandbox(tmp_path: Path, template: str) -> None:
    text = DEMO_LIKE.replace("trigger_words: [fine detail]", f'trigger_words: ["{template}"]')
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, text))
    problem = err.value.problems[0]
    assert problem.path == "adapters.detail.trigger_words[0]"
    assert problem.span is not None and problem.span.line == 4


def test_matrix_expands_and_is_bounded(tmp_path: Path) -> None:
    text = DEMO_LIKE.replace("lora_scale: 1.0", "lora_scale: '{{ s }}'") + "matrix:\n  s: [0.5, 1.0, 1.5]\n"
    loaded = load_recipe(write_recipe(tmp_path, text))
    assert [b.label for b in loaded.builds] == ["s-0.5", "s-1.0", "s-1.5"]
    assert load_recipe(write_recipe(tmp_path, text), {"s": "2"}).builds[0].label == "s-2"
    axes = "\n".join(f"  v{i}: [{', '.join(str(j) for j in range(10))}]" for i in range(7))
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, DEMO_LIKE + "matrix:\n" + axes + "\n"))
    assert f"more than the limit of {MAX_BUILDS}" in err.value.problems[0].message


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    assert load_recipe(write_recipe(tmp_path, DEMO_LIKE, "my recipe.yaml")).name == "my-recipe"


def test_an_adapter_listed_twice_is_refused() -> None:
    text = DEMO_LIKE.replace(
        "adapters: {style: 0.7, detail: 0.5}", "adapters: [style, style]\n  weights: [1, 1]"
    )
    assert "set_adapters: 'adapters' lists a name twice" in _problems(text)
