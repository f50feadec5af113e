"""Sample grids and model cards: deterministic, self-describing, and showing what they claim."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lorarecipe.builtin.materialize import builtin_base_path
from lorarecipe.compiler import compile_recipe
from lorarecipe.outputs.modelcard import CardInput, render_card
from lorarecipe.plan import SaveCheckpoint, SaveLora
from lorarecipe.recipe.load import load_recipe
from tests.helpers.golden import assert_golden
from tests.helpers.recipes import build_text, write_recipe

GOLDEN = Path(__file__).parent / "golden"

RECIPE = """\
name: grid-test
description: A grid test.
license: mit
base: builtin:tiny-sd
adapters:
  style: {builtin: tiny-sd/style, trigger_words: [watercolor]}
  detail: builtin:tiny-sd/detail
merges:
  both: {method: cat, adapters: [style, detail]}
set_adapters:
  adapters: {style: 0.7, detail: 0.5}
fuse:
  lora_scale: 1.0
outputs:
  fused: {kind: pipeline, path: fused}
  lora: {kind: lora, adapter: both, path: lora}
  grid:
    kind: grid
    path: grids/g.png
    prompts: [a photo of a cat]
    seeds: [0, 1]
    steps: 3
    variants: [base, style, both, mix, fused]
    sweep: {adapter: detail, weights: [0.0, 1.0]}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("grid")
    build_text(folder, RECIPE)
    return folder / "out"


@pytest.fixture(scope="module")
def rebuilt(built: Path) -> Path:
    """The same recipe file built again into another output root."""
    build_text(built.parent, RECIPE, out="again")
    return built.parent / "again"


def test_grid_layout_sidecar_and_chunks(built: Path) -> None:
    sidecar = json.loads((built / "grids" / "g.json").read_text())
    assert sidecar["columns"][:5] == [
        "base (LoRA off)",
        "style",
        "both",
        "mix: style 0.7, detail 0.5",
        "fused (lora_scale 1)",
    ]
    assert sidecar["columns"][5:] == ["mix, detail = 0", "mix, detail = 1"]
    assert len(sidecar["cells"]) == 2 * 7  # rows (prompt × seed) × columns
    style = next(c for c in sidecar["cells"] if c["variant"] == "style")
    assert style["prompt"] == "watercolor, a photo of a cat"  # trigger words of the active adapter
    assert sidecar["fused_vs_runtime_max_abs_diff"] <= 1e-3
    grid = Image.open(built / "grids" / "g.png")
    assert grid.text["lorarecipe.recipe_name"] == "grid-test"
    assert grid.text["lorarecipe.fingerprint"].startswith("sha256:")
    cell = Image.open(built / style["file"].replace("g_cells", "grids/g_cells", 1))
    assert (cell.text["lorarecipe.variant"], cell.text["lorarecipe.seed"]) == ("style", str(style["seed"]))
    assert cell.text["lorarecipe.prompt"] == style["prompt"]


def _render(pipe: Any, prompt: str, seed: int) -> np.ndarray:
    out = pipe(
        prompt=[prompt],
        negative_prompt=[""],
        num_inference_steps=3,
        guidance_scale=7.5,
        width=64,
        height=64,
        generator=[torch.Generator("cpu").manual_seed(seed)],
        output_type="np",
    ).images[0]
    return np.clip(np.round(out * 255), 0, 255).astype("uint8")


def test_base_column_is_the_lora_free_pipeline(built: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(builtin_base_path("tiny-sd")))
    pipe.set_progress_bar_config(disable=True)
    sidecar = json.loads((built / "grids" / "g.json").read_text())
    base = next(c for c in sidecar["cells"] if c["variant"] == "base" and c["seed"] == 1)
    cell = np.asarray(Image.open(built / "grids" / base["file"]).convert("RGB"))
    assert np.abs(cell.astype(int) - _render(pipe, base["prompt"], 1).astype(int)).max() <= 1


def test_grids_are_byte_identical_across_builds(built: Path, rebuilt: Path) -> None:
    for rel in ("grids/g.png", "grids/g.json", "fused/README.md", "lora/README.md"):
        a, b = (built / rel).read_bytes(), (rebuilt / rel).read_bytes()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), rel


def test_cards_have_front_matter_and_the_grid(built: Path) -> None:
    from huggingface_hub import ModelCard

    for folder in ("fused", "lora"):
        card = ModelCard.load(built / folder / "README.md")
        assert "lorarecipe" in card.data.tags
        assert ("lora" in card.data.tags) == (folder == "lora")  # a fused pipeline is not an adapter
        assert card.data.license == "mit" and card.data.instance_prompt == "watercolor"
        assert "![sample grid](images/g.png)" in card.text
        assert (built / folder / "images" / "g.png").is_file()
    lora_card = (built / "lora" / "README.md").read_text()
    assert "`both` = PEFT `add_weighted_adapter` with combination type `cat`" in lora_card
    assert "fuse_lora" not in lora_card  # the LoRA card describes the merge, not the fuse
    manifest = json.loads((built / "manifest.json").read_text())
    assert "lora/README.md" in {f["path"] for f in manifest["outputs"]["lora"]["files"]}


def test_model_card_golden(tmp_path: Path) -> None:
    loaded = load_recipe(write_recipe(tmp_path, RECIPE, "grid-test.yaml"))
    plan = compile_recipe(loaded)
    facts = CardInput(
        recipe_text=loaded.text,
        version="0.1.0",
        description="A grid test.",
        license="mit",
        adapter_sha256={"style": "a" * 64, "detail": "b" * 64},
        grid_path="images/g.png",
        grid_caption="Rows: prompt × seed.",
    )
    texts = []
    for step in plan.steps:
        if isinstance(step, (SaveCheckpoint, SaveLora)):
            texts.append(render_card(plan, step, facts).replace(str(tmp_path), "<tmp>"))
    text = "\n\n=====\n\n".join(texts)
    assert_golden(text, GOLDEN / "model_cards.md")


def test_cards_tag_only_adapters_as_lora_and_drop_the_schema_comment(tmp_path: Path) -> None:
    """The Hub lists ``lora``-tagged repos as adapters: a fused pipeline is a full model. The recipe's
    ``$schema`` comment points at a path relative to the recipe, which means nothing in a card."""
    text = "# yaml-language-server: $schema=../schemas/recipe.schema.json\n" + RECIPE
    loaded = load_recipe(write_recipe(tmp_path, text, "grid-test.yaml"))
    plan = compile_recipe(loaded)
    facts = CardInput(recipe_text=loaded.text, version="0.1.0")
    for step in plan.steps:
        if isinstance(step, (SaveCheckpoint, SaveLora)):
            card = render_card(plan, step, facts)
            front = card.split("---")[1]
            assert ("- lora\n" in front) == isinstance(step, SaveLora), step.output
            assert "$schema" not in card and "name: grid-test" in card


def test_the_card_caption_lists_every_grid_column(built: Path) -> None:
    card = (built / "fused" / "README.md").read_text()
    assert (
        "Rows: prompt × seed; columns: base, style, both, mix, fused, detail = 0, detail = 1 "
        "(3 steps, guidance 7.5, 64×64)." in card
    )
