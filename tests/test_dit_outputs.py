"""FLUX.2 and Wan outputs: single files as bases, merged LoRA files, sample grids and video cells.

- single file: FLUX.2's BFL transformer file (and a Wan expert's file) read back as a base with its
  config folder, by both executors (diffusers' model-level ``from_single_file`` for the pipeline
  route: ``Flux2Pipeline`` and ``WanPipeline`` have none), fusing exactly as from the folder;
- LoRA files: a FLUX.2 merge and a Wan expert's adapter written in the diffusers layout and in the
  kohya/ComfyUI layout reload (into the right expert) with every module applied and the deltas of the
  adapter they were written from; diffusers itself loads the diffusers-layout files;
- grids: FLUX.2 called without a negative prompt and with the LoRA scale in ``attention_kwargs`` (a
  ``lora_scale`` of 0 gives the base pixels); Wan cells are clips — the grid shows frame strips, each
  cell has an animated WebP whose frames are the strip's, and a rebuild from the cell cache writes
  the same bytes.
"""

from __future__ import annotations

import io
import json
import shutil
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, Flux2KleinPipeline, WanPipeline
from peft.tuners.lora import LoraLayer
from PIL import Image

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.errors import BuildError
from lorarecipe.runner.pipeline.adapters import injected_modules, load_adapter
from tests.helpers.dit_math import dit_deltas
from tests.helpers.lora_math import read_component_weights
from tests.helpers.recipes import build_text
from tests.test_streaming import _both


def _deltas(model: Any, adapter: str) -> dict[str, torch.Tensor]:
    """weight key -> the float64 delta a loaded adapter adds (PEFT's own get_delta_weight)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            out[f"{name}.weight"] = module.get_delta_weight(adapter).double()
    return out


# ---- single files as bases ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "lora", "family", "component"),
    [
        ("tiny-flux2-klein", "tiny-flux2-klein/detail", "flux2", "transformer"),
        ("tiny-wan22", "tiny-wan22/low", "wan", "transformer_2"),
    ],
)
def test_a_single_file_reads_back_as_a_base(
    tmp_path: Path, base: str, lora: str, family: str, component: str
) -> None:
    first = tmp_path / "first"
    first.mkdir()
    into = f", load_into: [{component}]" if family == "wan" else ""
    _both(
        first,
        f"""\
        base: builtin:{base}
        adapters: {{a: {{builtin: {lora}{into}}}}}
        fuse: {{adapters: [a], lora_scale: 0.5}}
        outputs:
          fused: {{kind: pipeline, path: fused}}
          file: {{kind: single_file, path: file.safetensors{", component: " + component if family == "wan" else ""}}}
        """,
    )
    second = tmp_path / "second"
    shutil.copytree(first / "stream", second)
    _both(
        second,
        f"""\
        base: {{file: file.safetensors, config: fused}}
        adapters: {{b: {{builtin: {lora}{", load_into: [transformer]" if family == "wan" else ""}}}}}
        fuse: {{adapters: [b], lora_scale: -0.5}}
        outputs: {{fused: {{kind: pipeline, path: again}}}}
        """,
    )
    # the file holds one expert; it comes back as the base's transformer, the rest from the config folder
    fused = read_component_weights(first / "stream" / "fused", component)
    again = read_component_weights(second / "stream" / "again", "transformer")
    deltas = dit_deltas(builtin_lora_path(lora), family, fused)
    for key, tensor in again.items():
        expected = fused[key].double() - 0.5 * deltas[key] if key in deltas else fused[key].double()
        torch.testing.assert_close(tensor.double(), expected, atol=1e-5, rtol=0, msg=key)


# ---- LoRA files ---------------------------------------------------------------------------------------


def test_flux2_merged_lora_files_reload_with_every_module(tmp_path: Path) -> None:
    """A ``cat`` merge (exact: w₁Δ₁ + w₂Δ₂) of a PEFT and an ai-toolkit Klein LoRA, in the diffusers
    layout and the kohya/ComfyUI layout (fused qkv as a block-diagonal LoRA)."""
    build_text(
        tmp_path,
        textwrap.dedent(
            """\
            base: builtin:tiny-flux2-klein
            adapters: {style: builtin:tiny-flux2-klein/style, aitk: builtin:tiny-flux2-klein/aitk}
            merges: {both: {method: cat, adapters: {style: 0.6, aitk: -1.2}}}
            outputs:
              diffusers: {kind: lora, adapter: both, path: d}
              kohya: {kind: lora, adapter: both, path: k, layout: kohya}
            """
        ),
    )
    base = read_component_weights(builtin_base_path("tiny-flux2-klein"), "transformer")
    expected: dict[str, torch.Tensor] = {}
    for name, weight in (("style", 0.6), ("aitk", -1.2)):
        for key, delta in dit_deltas(builtin_lora_path(f"tiny-flux2-klein/{name}"), "flux2", base).items():
            expected[key] = expected.get(key, torch.zeros_like(delta)) + weight * delta
    pipe = Flux2KleinPipeline.from_pretrained(str(builtin_base_path("tiny-flux2-klein")))
    for adapter, path in (
        ("d", tmp_path / "out" / "d" / "pytorch_lora_weights.safetensors"),
        ("k", tmp_path / "out" / "k" / "both.safetensors"),
    ):
        load_adapter(pipe, adapter, path, "flux2")  # refuses any module diffusers would skip
        loaded = _deltas(pipe.transformer, adapter)
        assert set(loaded) == set(expected), adapter
        for key, delta in expected.items():
            torch.testing.assert_close(loaded[key], delta, atol=1e-6, rtol=0, msg=f"{adapter} {key}")
    fresh = Flux2KleinPipeline.from_pretrained(str(builtin_base_path("tiny-flux2-klein")))
    for adapter, path in (("d", "d/pytorch_lora_weights.safetensors"), ("k", "k/both.safetensors")):
        fresh.load_lora_weights(str(tmp_path / "out" / path), adapter_name=adapter)  # diffusers alone
        assert len(injected_modules(fresh.transformer, adapter)) == len(expected), adapter


def test_wan_expert_lora_files_load_into_that_expert(tmp_path: Path) -> None:
    """The low-noise expert's copy of an adapter loaded into both experts: a LoRA file of the
    ``transformer`` names (as Wan LoRAs are), loaded back into ``transformer_2`` — by lorarecipe for both
    layouts, and by diffusers (``load_into_transformer_2=True``) for the diffusers layout."""
    build_text(
        tmp_path,
        textwrap.dedent(
            """\
            base: builtin:tiny-wan22
            adapters: {style: {builtin: tiny-wan22/style, load_into: [transformer, transformer_2]}}
            outputs:
              low: {kind: lora, adapter: style, path: low, component: transformer_2}
              low_k: {kind: lora, adapter: style, path: low_k, layout: kohya, component: transformer_2}
            """
        ),
    )
    pipe = WanPipeline.from_pretrained(str(builtin_base_path("tiny-wan22")))
    with pytest.raises(BuildError, match="the base has two experts"):  # a hub base is checked once loaded
        load_adapter(pipe, "nowhere", tmp_path / "out" / "low" / "pytorch_lora_weights.safetensors", "wan")
    base = read_component_weights(builtin_base_path("tiny-wan22"), "transformer_2")
    expected = dit_deltas(builtin_lora_path("tiny-wan22/style"), "wan", base)
    for adapter, path in (("d", "low/pytorch_lora_weights.safetensors"), ("k", "low_k/style.safetensors")):
        load_adapter(pipe, adapter, tmp_path / "out" / path, "wan", ("transformer_2",))
        assert not injected_modules(pipe.transformer, adapter)
        loaded = _deltas(pipe.transformer_2, adapter)
        assert set(loaded) == set(expected), adapter
        for key, delta in expected.items():
            torch.testing.assert_close(loaded[key], delta, atol=1e-6, rtol=0, msg=f"{adapter} {key}")
    pipe.load_lora_weights(
        str(tmp_path / "out" / "low" / "pytorch_lora_weights.safetensors"),
        adapter_name="x",
        load_into_transformer_2=True,
    )
    assert len(injected_modules(pipe.transformer_2, "x")) == len(expected)


# ---- grids --------------------------------------------------------------------------------------------


@pytest.fixture
def klein_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    original = Flux2KleinPipeline.__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append({k: v for k, v in kwargs.items() if k != "generator"})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Flux2KleinPipeline, "__call__", spy)
    return seen


def _cell(folder: Path, sidecar: dict[str, Any], column: int) -> np.ndarray:
    cell = next(c for c in sidecar["cells"] if c["column"] == column)
    return np.asarray(Image.open(folder / cell["file"]))


def test_flux2_grid_takes_the_lora_scale_through_attention_kwargs(
    tmp_path: Path, klein_calls: list[dict[str, Any]]
) -> None:
    build_text(
        tmp_path,
        textwrap.dedent(
            """\
            base: builtin:tiny-flux2-klein
            adapters: {style: builtin:tiny-flux2-klein/style, detail: builtin:tiny-flux2-klein/detail}
            set_adapters: {adapters: {style: 0.9, detail: {transformer: {single_blocks: 2.0}}}}
            fuse: {lora_scale: 1.0}
            outputs:
              grid: {kind: grid, path: grid.png, prompts: [a red cat], steps: 2,
                     variants: [base, mix, fused], sweep: {lora_scale: [0.0, 1.0]}}
            """
        ),
    )
    sidecar = json.loads((tmp_path / "out" / "grid.json").read_text())
    assert sidecar["guidance"] == 4.0 and sidecar["fused_vs_runtime_max_abs_diff"] < 1e-4
    assert all("negative_prompt" not in c and c["guidance_scale"] == 4.0 for c in klein_calls)
    scales = sorted(c["attention_kwargs"]["scale"] for c in klein_calls if c.get("attention_kwargs"))
    assert scales == [0.0, 1.0, 1.0]  # the sweep and the runtime equivalent of 'fused'
    folder = tmp_path / "out"
    base, mix, zero, one = (_cell(folder, sidecar, i) for i in (0, 1, 3, 4))
    assert np.array_equal(zero, base) and np.array_equal(one, mix) and not np.array_equal(mix, base)


def test_flux2_grid_refuses_a_negative_prompt(tmp_path: Path) -> None:
    from tests.helpers.recipes import messages, problems_of

    text = """\
        base: builtin:tiny-flux2
        adapters: {style: builtin:tiny-flux2/style}
        outputs:
          grid: {kind: grid, path: g.png, prompts: [a cat], variants: [base, style], negative_prompt: blurry,
                 true_cfg_scale: 2.0, frames: 9}
        """
    assert messages(problems_of(tmp_path, textwrap.dedent(text))) == [
        "outputs.grid.frames: FLUX.2 makes images, not videos [remove frames]",
        "outputs.grid.negative_prompt: FLUX.2 pipelines take no negative prompt [remove negative_prompt]",
        "outputs.grid.true_cfg_scale: FLUX.2 pipelines have no true_cfg_scale: 'guidance' is FLUX.2 dev: the "
        "embedded distilled guidance; Klein base models: classifier-free guidance (empty negative prompt); "
        "the step-distilled Klein models ignore it",
    ]


WAN_GRID = """\
    base: builtin:tiny-wan22
    adapters:
      high: {builtin: tiny-wan22/high, load_into: [transformer], trigger_words: [cinematic]}
      low: {builtin: tiny-wan22/low, load_into: [transformer_2]}
    set_adapters: {adapters: {high: 0.8, low: {transformer_2: {blocks: 1.5}}}}
    fuse: {lora_scale: 1.0}
    outputs:
      grid: {kind: grid, path: grid.png, prompts: [a cat], steps: 2, frames: 5, variants: [base, high, mix, fused]}
    """


def test_wan_grid_cells_are_clips(tmp_path: Path) -> None:
    build_text(tmp_path, textwrap.dedent(WAN_GRID))
    folder = tmp_path / "out"
    sidecar = json.loads((folder / "grid.json").read_text())
    assert sidecar["frames"] == 5 and sidecar["fused_vs_runtime_max_abs_diff"] < 1e-4
    assert sidecar["cells"][1]["prompt"] == "cinematic, a cat"
    for cell in sidecar["cells"]:
        strip = np.asarray(Image.open(folder / cell["file"]))
        assert strip.shape == (64, 5 * 64, 3)
        clip = Image.open(io.BytesIO((folder / cell["video"]).read_bytes()))
        assert clip.format == "WEBP" and clip.n_frames == 5
        for index in range(5):
            clip.seek(index)
            assert np.array_equal(np.asarray(clip.convert("RGB")), strip[:, index * 64 : (index + 1) * 64])
    grid = Image.open(folder / "grid.png")
    assert grid.width > 4 * 5 * 128  # four columns of 5-frame strips, frames enlarged to 128 px
    written = {
        p.name: p.read_bytes() for p in [folder / "grid.png", *sorted((folder / "grid_cells").iterdir())]
    }
    shutil.rmtree(folder)
    build_text(tmp_path, textwrap.dedent(WAN_GRID))  # every cell from the cell cache: no pipeline
    again = {
        p.name: p.read_bytes() for p in [folder / "grid.png", *sorted((folder / "grid_cells").iterdir())]
    }
    assert again == written


def test_wan_pipeline_is_called_as_wan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    original = WanPipeline.__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append({k: v for k, v in kwargs.items() if k != "generator"})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(WanPipeline, "__call__", spy)
    text = WAN_GRID.replace("frames: 5", "frames: 5, negative_prompt: blurry, sweep: {lora_scale: [0.5]}")
    build_text(tmp_path, textwrap.dedent(text))
    assert all(c["num_frames"] == 5 and c["negative_prompt"] == ["blurry"] for c in seen)
    assert sorted(c["attention_kwargs"]["scale"] for c in seen if c.get("attention_kwargs")) == [0.5, 1.0]
    assert isinstance(DiffusionPipeline.from_pretrained(str(builtin_base_path("tiny-wan22"))), WanPipeline)
