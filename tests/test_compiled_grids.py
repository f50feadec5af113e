"""Grids rendered through a regionally compiled denoiser (``compile: regional``), by weight copy.

The compile backend is torch's counting backend (``CompileCounter``: it counts the frames Dynamo
compiles and runs the captured graph as is), so these tests check what compiling must not change:
no recompilation when a column's or another build's weights are copied in, and pixels equal to an
eager render of the same weights. The inductor backend's own float differences are measured in the
README, not asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lorarecipe.compiler import compile_recipe
from lorarecipe.recipe.load import load_recipe
from lorarecipe.runner import run_plan
from tests.helpers.batch_builds import forget_rendered_cells
from tests.helpers.recipes import write_recipe

pytestmark = pytest.mark.slow

RECIPE = """\
base: builtin:tiny-sd
adapters:
  first: builtin:tiny-sd/{first}
  second: builtin:tiny-sd/{second}
set_adapters:
  adapters: {{first: 0.7, second: 0.5}}
fuse: {{lora_scale: 0.8}}
outputs:
  grid: {{kind: grid, path: grid.png, prompts: [a cat], seeds: [0, 1], steps: 2,
         variants: [base, first, mix, fused], sweep: {{lora_scale: [1.5]}}, compile: {compile}}}
"""


@pytest.fixture(autouse=True)
def _render_every_cell() -> None:
    forget_rendered_cells()


def _build(folder: Path, text: str, pipelines: Any = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    loaded = load_recipe(write_recipe(folder, text))
    run_plan(
        compile_recipe(loaded),
        out_root=folder / "out",
        recipe_root=loaded.root,
        recipe_text=loaded.text,
        executor="diffusers",
        pipelines=pipelines,
    )
    return folder / "out"


def _cells(out: Path) -> dict[str, Any]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "grid_cells").iterdir())}


def test_variants_and_builds_copy_weights_into_one_compiled_denoiser(tmp_path: Path) -> None:
    from torch._dynamo.testing import CompileCounter

    from lorarecipe.runner.pipeline.warm import WarmPipelines

    counter = CompileCounter()
    pipelines = WarmPipelines(compile_backend=counter)
    first = _build(
        tmp_path / "a", RECIPE.format(first="style", second="detail", compile="regional"), pipelines
    )
    frames = counter.frame_count
    assert frames > 0
    second = _build(tmp_path / "b", RECIPE.format(first="toy", second="pixel", compile="regional"), pipelines)
    assert counter.frame_count == frames  # other adapters, weights, a fuse: copied in place, no recompile
    assert pipelines.loads == 1 and pipelines.reuses == 1
    for out in (first, second):
        assert json.loads((out / "manifest.json").read_text())["outputs"]["grid"]["compiled"] == "regional"
    a, b = _cells(first), _cells(second)
    assert np.array_equal(a["r00_c00_base.png"], b["r00_c00_base.png"])  # the pristine base, both times
    assert not np.array_equal(a["r00_c02_mix.png"], b["r00_c02_mix.png"])  # the second LoRAs were copied in


def test_compiled_cells_equal_an_eager_render_of_the_same_weights(tmp_path: Path) -> None:
    """base and fused cells: equal to the eager grid's (same weights, same graph). mix and the
    lora_scale sweep: equal to an eager pipeline whose UNet was fused by diffusers' fuse_lora with the
    column's weights and scale (the text encoder keeps its live LoRA, as in the compiled render)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from torch._dynamo.testing import CompileCounter

    from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
    from lorarecipe.runner.pipeline.warm import WarmPipelines

    compiled = _cells(
        _build(
            tmp_path / "c",
            RECIPE.format(first="style", second="detail", compile="regional"),
            WarmPipelines(compile_backend=CompileCounter()),
        )
    )
    eager = _cells(_build(tmp_path / "e", RECIPE.format(first="style", second="detail", compile="none")))
    for name in compiled:
        if "_base" in name or "_fused" in name:
            assert np.array_equal(compiled[name], eager[name]), name

    def oracle(scale: float) -> list[Any]:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(builtin_base_path("tiny-sd")), local_files_only=True
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(builtin_lora_path("tiny-sd/style")), adapter_name="first")
        pipe.load_lora_weights(str(builtin_lora_path("tiny-sd/detail")), adapter_name="second")
        pipe.set_adapters(["first", "second"], adapter_weights=[0.7, 0.5])
        pipe.fuse_lora(components=["unet"], lora_scale=scale, adapter_names=["first", "second"])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the grid renders (its 'threads', default 1): GEMMs round per count
        try:
            images = pipe(
                prompt=["a cat"] * 2,
                negative_prompt=[""] * 2,
                num_inference_steps=2,
                guidance_scale=7.5,
                width=64,
                height=64,
                generator=[torch.Generator("cpu").manual_seed(s) for s in (0, 1)],
                output_type="np",
                cross_attention_kwargs={"scale": scale} if scale != 1.0 else None,
            ).images
        finally:
            torch.set_num_threads(threads)
        return [np.clip(np.round(a * 255), 0, 255).astype("uint8") for a in images]

    for column, scale in (("c02_mix", 1.0), ("c04_sweep", 1.5)):
        for row, expected in enumerate(oracle(scale)):
            assert np.array_equal(compiled[f"r{row:02d}_{column}.png"], expected), (column, row)
