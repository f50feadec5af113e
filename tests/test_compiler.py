"""Compiler: static checks from headers only, and the plan it produces."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lorarecipe.compiler import compile_recipe
from lorarecipe.plan import FuseAdapters, Kind, LoadAdapter, MergeAdapters, SaveLora, SetAdapters, thaw_weight
from lorarecipe.recipe.load import load_recipe
from tests.helpers.recipes import DEMO_LIKE, compile_text, messages, problems_of, write_recipe

REPO = Path(__file__).resolve().parents[1]


def test_every_example_recipe_compiles() -> None:
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        loaded = load_recipe(path)
        for build in loaded.builds:
            plan = compile_recipe(loaded, build)
            assert plan.steps[0].op == "load_base"


def test_example_recipes_carry_the_schema_header() -> None:
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        assert path.read_text().startswith("# yaml-language-server: $schema=../schemas/recipe.schema.json")


def test_hub_inputs_not_in_cache_are_unchecked_until_fetched() -> None:
    plan = compile_recipe(load_recipe(REPO / "recipes" / "ikea-feng-fused.yaml"))
    statuses = {c.subject: c.status for c in plan.checks}
    assert statuses == {"base": "unchecked", "adapters.ikea": "unchecked", "adapters.feng": "unchecked"}
    assert dict(plan.estimates)["diffusers"] is None


def test_plan_steps_edges_and_weights(tmp_path: Path) -> None:
    plan = compile_text(tmp_path, DEMO_LIKE)
    ids = [s.id for s in plan.steps]
    assert ids == [
        "base",
        "adapter:style",
        "adapter:detail",
        "merge:both",
        "mix",
        "fuse",
        "output:fused",
        "output:lora",
    ]
    merge = plan.step("merge:both")
    assert isinstance(merge, MergeAdapters) and merge.inputs == ("adapter:style", "adapter:detail")
    assert merge.weights == (1.0, 0.5)
    fuse = plan.step("fuse")
    assert isinstance(fuse, FuseAdapters)
    assert fuse.adapters == ("style", "detail") and fuse.weights == (0.7, 0.5) and fuse.lora_scale == 1.0
    assert fuse.produces is Kind.FUSED
    lora = plan.step("output:lora")
    assert isinstance(lora, SaveLora) and lora.inputs == ("merge:both",)
    assert lora.weight_name == "pytorch_lora_weights.safetensors"
    # steps are hashable values: equal steps are one
    assert len({*plan.steps, *plan.steps}) == len(plan.steps)


def test_fingerprint_ignores_comments_layout_and_location(tmp_path: Path) -> None:
    a = compile_text(tmp_path, DEMO_LIKE)
    other = tmp_path / "elsewhere"
    other.mkdir()
    commented = "# a comment\n\n" + DEMO_LIKE.replace("lora_scale: 1.0", "lora_scale: 1.0   # same")
    b = compile_text(other, commented)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint().startswith("sha256:") and len(a.fingerprint()) == 71
    c = compile_text(other, DEMO_LIKE.replace("lora_scale: 1.0", "lora_scale: 0.9"))
    assert c.fingerprint() != a.fingerprint()


def test_per_block_weights_are_frozen_and_thawed(tmp_path: Path) -> None:
    text = DEMO_LIKE.replace(
        "adapters: {style: 0.7, detail: 0.5}",
        "adapters: {style: {unet: {down: 0.5, up: {block_1: [0.2, 0.3]}}, text_encoder: 0.8}, detail: 0.5}",
    )
    plan = compile_text(tmp_path, text)
    mix = plan.step("mix")
    assert isinstance(mix, SetAdapters)
    hash(mix)
    assert thaw_weight(mix.weights[0]) == {
        "unet": {"down": 0.5, "up": {"block_1": [0.2, 0.3]}},
        "text_encoder": 0.8,
    }


def test_all_reference_problems_reported_at_once_with_hints(tmp_path: Path) -> None:
    text = """\
    base: builtin:tiny-sd
    adapters:
      style: builtin:tiny-sd/style
      detail: builtin:tiny-sd/detail
    merges:
      mixed:
        method: cat
        adapters: [style, detial]
      style:
        method: cat
        adapters: [style, detail]
    set_adapters:
      adapters: [styel]
    outputs:
      lora: {kind: lora, adapter: mixd, path: out}
      grid: {kind: grid, path: g.png, prompts: [a], variants: [base, fused, stlye]}
      fused: {kind: pipeline, path: fused}
    """
    found = messages(problems_of(tmp_path, text))
    assert "merges.mixed.adapters[1]: unknown adapter 'detial' [did you mean 'detail'?]" in found
    assert any(m.startswith("merges.style: merge name 'style' is already an adapter name") for m in found)
    assert "set_adapters.adapters[0]: unknown adapter 'styel' [did you mean 'style'?]" in found
    assert "outputs.lora.adapter: unknown adapter 'mixd' [did you mean 'mixed'?]" in found
    assert "outputs.grid.variants[1]: variant 'fused' needs a 'fuse' section" in found
    assert "outputs.grid.variants[2]: unknown variant 'stlye' [did you mean 'style'?]" in found
    assert any(
        m.startswith("outputs.fused.kind: a pipeline output saves the fused checkpoint") for m in found
    )


def test_problems_are_located_at_the_offending_node(tmp_path: Path) -> None:
    text = DEMO_LIKE.replace("adapters: {style: 1.0, detail: 0.5}", "adapters: {style: 1.0, detial: 0.5}")
    (problem,) = problems_of(tmp_path, text)
    assert problem.span is not None
    line = text.splitlines()[problem.span.line - 1]
    assert line[problem.span.col - 1 :].startswith("detial")


def test_equal_rank_methods_refuse_unequal_ranks_with_a_fix(tmp_path: Path) -> None:
    text = DEMO_LIKE.replace("method: cat", "method: ties\n    density: 0.5")
    (problem,) = problems_of(tmp_path, text)
    assert problem.path == "merges.both.method"
    assert (
        "needs equal ranks" in problem.message
        and "style r4" in problem.message
        and "detail r8" in problem.message
    )
    assert problem.hint == "use 'cat' (exact, rank = sum) or 'ties_svd'"
    # the svd form and cat accept them
    compile_text(tmp_path, DEMO_LIKE.replace("method: cat", "method: ties_svd\n    density: 0.5"))


def test_merges_of_merges_use_the_merged_rank(tmp_path: Path) -> None:
    text = DEMO_LIKE.replace(
        "set_adapters:",
        "  again:\n    method: linear\n    adapters: [both, toy]\nset_adapters:",
    ).replace("  detail: {", "  toy: builtin:tiny-sd/toy\n  detail: {")
    (problem,) = problems_of(tmp_path, text)
    assert "both r12" in problem.message and "toy r4" in problem.message


def test_merge_cycles_are_reported(tmp_path: Path) -> None:
    text = DEMO_LIKE.replace(
        "set_adapters:",
        "  m1: {method: cat, adapters: [m2, style]}\n  m2: {method: cat, adapters: [m1, detail]}\nset_adapters:",
    )
    assert any("cycle" in m for m in messages(problems_of(tmp_path, text)))


def test_lora_for_another_builtin_base(tmp_path: Path) -> None:
    text = DEMO_LIKE.replace("detail: {builtin: tiny-sd/detail", "detail: {builtin: tiny-sdxl/detail")
    found = messages(problems_of(tmp_path, text))
    assert (
        "adapters.detail.builtin: built-in LoRA tiny-sdxl/detail was made for tiny-sdxl, but the base is tiny-sd"
        in (found)
    )


def test_local_adapter_file_checks(tmp_path: Path) -> None:
    from lorarecipe.builtin.materialize import builtin_lora_path

    (tmp_path / "loras").mkdir()
    shutil.copy(builtin_lora_path("tiny-sd/style"), tmp_path / "loras" / "style.safetensors")
    shutil.copy(builtin_lora_path("tiny-sdxl/style"), tmp_path / "loras" / "xl.safetensors")
    (tmp_path / "loras" / "old.ckpt").write_bytes(b"\x80\x04junk")
    (tmp_path / "loras" / "fake.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    text = """\
    base: builtin:tiny-sd
    adapters:
      good: {file: loras/style.safetensors, format: kohya}
      typo: {file: loras/stlye.safetensors}
      pickle: {file: loras/old.ckpt}
      fake: {file: loras/fake.safetensors}
      folder: {file: loras}
      escape: {file: ../outside.safetensors}
      xl: {file: loras/xl.safetensors}
    outputs:
      lora: {kind: lora, adapter: good, path: out}
    """
    found = messages(problems_of(tmp_path, text))
    assert (
        "adapters.good.format: declared format 'kohya' but the file is in peft layout [remove 'format' to detect it]"
        in (found)
    )
    assert (
        "adapters.typo.file: file not found: loras/stlye.safetensors [did you mean 'style.safetensors'?]"
        in found
    )
    assert any(m.startswith("adapters.pickle.file: loras/old.ckpt: pickle-based checkpoints") for m in found)
    assert any(m.startswith("adapters.fake.file:") and "pickle" in m for m in found)
    assert any(m.startswith("adapters.folder.file: loras is a folder") for m in found)
    assert any(
        m.startswith("adapters.escape.file: input path '../outside.safetensors' leaves the recipe's folder")
        for m in found
    )
    assert any(m.startswith("adapters.xl:") and "do not fit the base" in m for m in found)


def test_symlink_escaping_the_recipe_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.safetensors").write_bytes(b"")
    inner = tmp_path / "recipe"
    inner.mkdir()
    (inner / "link.safetensors").symlink_to(outside / "x.safetensors")
    text = DEMO_LIKE.replace("style: builtin:tiny-sd/style", "style: {file: link.safetensors}")
    found = messages(problems_of(inner, text))
    assert any("is a symlink that leaves the recipe's folder" in m for m in found)
    # an explicitly allowed directory is fine for the path policy (the empty file then fails its header check)
    found = messages(problems_of(inner, text, allow_read=[outside]))
    assert not any("leaves the recipe's folder" in m for m in found)


def test_output_paths_escape_and_collisions(tmp_path: Path) -> None:
    text = DEMO_LIKE.replace("path: fused}", "path: ../fused}").replace("path: lora}", "path: /tmp/lora}")
    found = messages(problems_of(tmp_path, text))
    assert "outputs.fused.path: output path '../fused' leaves the output root ('..')" in found
    assert any(m.startswith("outputs.lora.path: output path '/tmp/lora' is absolute") for m in found)
    text = DEMO_LIKE.replace("path: lora}", "path: fused/lora}")
    assert any("would be written inside outputs.fused" in m for m in messages(problems_of(tmp_path, text)))
    text = DEMO_LIKE.replace("path: lora}", "path: Fused}")
    assert any("collides with outputs.fused" in m for m in messages(problems_of(tmp_path, text)))
    grid = (
        DEMO_LIKE
        + "  grid: {kind: grid, path: g.png, prompts: [a]}\n  sidecar: {kind: lora, adapter: both, path: g_cells}\n"
    )
    assert any(
        "outputs.sidecar.path: output path 'g_cells' collides with outputs.grid" in m
        for m in messages(problems_of(tmp_path, grid))
    )
    text = DEMO_LIKE.replace("path: lora}", "path: manifest.json}")
    assert any("reserved" in m for m in messages(problems_of(tmp_path, text)))


def test_per_block_weights_on_a_transformer_family(tmp_path: Path) -> None:
    text = """\
    base: {hub: black-forest-labs/FLUX.1-dev, family: flux}
    adapters:
      a: {hub: org/lora, weight_name: a.safetensors}
    set_adapters:
      adapters: {a: {unet: {down: 0.5}}}
    outputs:
      grid: {kind: grid, path: g.png, prompts: [x], variants: [mix]}
    """
    found = messages(problems_of(tmp_path, text))
    assert any(
        m.startswith("set_adapters.adapters.a.unet: FLUX.1 has no LoRA component 'unet'") for m in found
    )
    assert any("per-block weights only work on UNet models" in m for m in found)


def test_real_sd2_lora_on_an_sd1_base_names_both_families(tmp_path: Path, realdata: Path) -> None:
    text = f"""\
    base: builtin:tiny-sd
    adapters:
      sd2: {{file: {realdata}/loras/justinjiang_lora2/pytorch_lora_weights.safetensors}}
      sd15: {{file: {realdata}/loras/timohavdk_sd_lora/pytorch_lora_weights.safetensors}}
      disney: {{file: {realdata}/loras/cloneofsimo_lora/lora_disney.safetensors}}
      lokr: {{file: {realdata}/loras/lycoris_lokr/smart_falcon_4_lokr.safetensors}}
      broken: {{file: {realdata}/loras/timohavdk_sd_lora/new.safetensors}}
    outputs:
      lora: {{kind: lora, adapter: sd2, path: out}}
    """
    found = messages(problems_of(tmp_path, text, allow_read=[realdata]))
    sd2 = next(m for m in found if m.startswith("adapters.sd2:"))
    assert "SD 2.x" in sd2 and "SD 1.x" in sd2
    assert any(m.startswith("adapters.sd15:") and "do not fit the base" in m for m in found)
    assert any(m.startswith("adapters.disney: cannot load this LoRA") and "cloneofsimo" in m for m in found)
    assert any(m.startswith("adapters.lokr: cannot load this LoRA") and "LoKr" in m for m in found)
    assert any(
        m.startswith("adapters.broken: cannot load this LoRA") and "lora_unet_unet_" in m for m in found
    )


def test_load_adapter_steps_keep_sources_relative(tmp_path: Path) -> None:
    from lorarecipe.builtin.materialize import builtin_lora_path

    shutil.copy(builtin_lora_path("tiny-sd/style"), tmp_path / "style.safetensors")
    plan = compile_text(
        tmp_path, DEMO_LIKE.replace("style: builtin:tiny-sd/style", "style: {file: style.safetensors}")
    )
    step = plan.step("adapter:style")
    assert isinstance(step, LoadAdapter) and step.source.ref == "style.safetensors"
    assert str(tmp_path) not in str(plan.to_json()["steps"])


def test_matrix_builds_compile_separately(tmp_path: Path) -> None:
    text = (
        DEMO_LIKE.replace("lora_scale: 1.0", "lora_scale: '{{ scale }}'") + "matrix:\n  scale: [0.5, 1.0]\n"
    )
    loaded = load_recipe(write_recipe(tmp_path, text))
    plans = [compile_recipe(loaded, b) for b in loaded.builds]
    assert [p.build for p in plans] == ["scale-0.5", "scale-1.0"]
    scales = [p.step("fuse").lora_scale for p in plans]  # type: ignore[attr-defined]
    assert scales == [0.5, 1.0]
    assert plans[0].fingerprint() != plans[1].fingerprint()


@pytest.mark.parametrize("name", ["base", "mix", "fused"])
def test_reserved_names(tmp_path: Path, name: str) -> None:
    text = DEMO_LIKE.replace(
        "  style: builtin:tiny-sd/style", f"  style: builtin:tiny-sd/style\n  {name}: builtin:tiny-sd/toy"
    )
    assert any("is reserved for grid variants" in m for m in messages(problems_of(tmp_path, text)))
