"""FLUX.1 Kontext and Fill: bases that share FLUX.1's transformer, on tiny copies of tiny-flux.

Each variant is the built-in tiny-flux folder with its ``model_index.json`` naming the variant's
pipeline class; Fill's transformer also takes 384 input channels (latents, masked image and mask, as
FLUX.1-Fill-dev's ``x_embedder``), built here from tiny-flux's weights plus seeded new columns.

- fuse: built-in FLUX.1 LoRAs (PEFT + CLIP, kohya BFL names with fused qkv/linear1) with per-block
  weights fuse bit-identically on both executors, and the fused transformer equals
  W + s·Σ wᵢ(module)·ΔWᵢ read from the files by ``tests.helpers.lora_math`` (float64), each module's
  block weight recomputed by ``tests.test_flux_fuse``'s own parsing; nothing else changes (Fill's wide
  ``x_embedder`` included);
- the BFL single file holds every fused tensor in its original place (``img_in`` 384 wide for Fill),
  and streams back as a base with the variant's folder as its config, bit for bit;
- a merged LoRA exported in the kohya layout holds the merge's deltas;
- a grid on one is refused at compile time, naming the pipeline and why (it needs an input image).
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from tests.helpers.lora_math import lora_deltas, read_component_weights
from tests.helpers.recipes import build_text, messages, problems_of
from tests.test_flux_fuse import _block_weight
from tests.test_flux_outputs import _from_bfl
from tests.test_streaming import _both

VARIANTS = ("FluxKontextPipeline", "FluxKontextInpaintPipeline", "FluxFillPipeline")
FILL_IN_CHANNELS = 384  # FLUX.1-Fill-dev's x_embedder input: latents | masked image latents | mask
STYLE_BLOCKS = {"double_blocks": {"0": 0.5, "1": -0.3}, "single_blocks": {"1": 2.0}, "default": 0.25}


def _variant(root: Path, pipeline_class: str) -> Path:
    """tiny-flux copied as a ``pipeline_class`` folder (Fill: with a 384-channel x_embedder)."""
    folder = root / "variant"
    shutil.copytree(builtin_base_path("tiny-flux"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = pipeline_class
    if pipeline_class == "FluxFillPipeline":  # FluxFillPipeline has no image encoder
        del index["image_encoder"], index["feature_extractor"]
        config = json.loads((folder / "transformer" / "config.json").read_text())
        config["out_channels"] = config["in_channels"]
        config["in_channels"] = FILL_IN_CHANNELS
        (folder / "transformer" / "config.json").write_text(json.dumps(config))
        weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        tensors = load_file(str(weights))
        narrow = tensors["x_embedder.weight"]
        extra = torch.randn(
            narrow.shape[0], FILL_IN_CHANNELS - narrow.shape[1], generator=torch.Generator().manual_seed(5)
        )
        tensors["x_embedder.weight"] = torch.cat([narrow, 0.02 * extra], dim=1).to(narrow.dtype).contiguous()
        save_file(tensors, str(weights))
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


RECIPE = f"""\
    base: {{path: variant}}
    adapters:
      style: builtin:tiny-flux/style
      detail: builtin:tiny-flux/detail
    merges:
      both: {{method: cat, adapters: {{style: 0.8, detail: -0.5}}}}
    set_adapters:
      adapters:
        style: {{transformer: {json.dumps(STYLE_BLOCKS).replace('"', "")}}}
        detail: -0.6
    fuse: {{adapters: [style, detail], lora_scale: 0.9, components: [transformer]}}
    outputs:
      fused: {{kind: pipeline, path: fused}}
      single: {{kind: single_file, path: flux1.safetensors}}
      both: {{kind: lora, adapter: both, path: both, layout: kohya}}
    """


@pytest.mark.parametrize("pipeline_class", VARIANTS)
def test_a_variant_fuses_and_writes_as_flux1(tmp_path: Path, pipeline_class: str) -> None:
    folder = _variant(tmp_path, pipeline_class)
    base = {c: read_component_weights(folder, c) for c in ("transformer", "text_encoder")}
    _both(tmp_path, RECIPE)  # the stream and the pipeline route bit for bit (fused folder, single file)

    expected: dict[str, torch.Tensor] = {}
    for name, weight in (("style", None), ("detail", -0.6)):
        for (component, key), delta in lora_deltas(builtin_lora_path(f"tiny-flux/{name}"), base).items():
            if component == "transformer":
                block = _block_weight(STYLE_BLOCKS, key.removesuffix(".weight")) if weight is None else weight
                expected[key] = expected.get(key, torch.zeros_like(delta)) + 0.9 * block * delta
    fused = read_component_weights(tmp_path / "stream" / "fused", "transformer")
    assert fused.keys() == base["transformer"].keys() and len(expected) > 20
    for key, tensor in fused.items():
        original = base["transformer"][key]
        if key in expected and expected[key].any():
            torch.testing.assert_close(tensor.double(), original.double() + expected[key], atol=1e-5, rtol=0)
        else:
            assert torch.equal(tensor, original), key
    encoder = read_component_weights(tmp_path / "stream" / "fused", "text_encoder")
    assert all(torch.equal(tensor, base["text_encoder"][key]) for key, tensor in encoder.items())

    single = load_file(str(tmp_path / "stream" / "flux1.safetensors"))
    assert all(torch.equal(tensor, _from_bfl(key, fused)) for key, tensor in single.items())
    width = FILL_IN_CHANNELS if pipeline_class == "FluxFillPipeline" else 16
    assert single["img_in.weight"].shape[1] == width

    kohya = load_file(str(tmp_path / "pipe" / "both" / "both.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    merged = lora_deltas(tmp_path / "pipe" / "both" / "both.safetensors", base)
    terms = [(0.8, "style"), (-0.5, "detail")]
    sources = {name: lora_deltas(builtin_lora_path(f"tiny-flux/{name}"), base) for _, name in terms}
    assert set(merged) == set(sources["style"]) | set(sources["detail"])
    for module, delta in merged.items():
        want = sum(w * sources[n][module] for w, n in terms if module in sources[n])
        torch.testing.assert_close(delta, want, atol=1e-6, rtol=0)


def test_a_fill_single_file_streams_back_as_a_base(tmp_path: Path) -> None:
    """The 384-channel single file with the Fill folder as its config: a fuse at scale 0 gives back
    the transformer it was written from, bit for bit."""
    folder = _variant(tmp_path, "FluxFillPipeline")
    first = build_text(
        tmp_path, textwrap.dedent(RECIPE).replace("  both: {kind: lora", "  #both: {kind: lora")
    )
    assert first.manifest is not None
    again = build_text(
        tmp_path,
        """\
        base: {file: out/flux1.safetensors, config: variant}
        adapters: {style: builtin:tiny-flux/style}
        fuse: {adapters: [style], lora_scale: 0.0, components: [transformer]}
        outputs: {again: {kind: pipeline, path: again}}
        """,
        out="out2",
        name="again.yaml",
    )
    assert again.manifest is not None and folder.is_dir()
    read = read_component_weights(tmp_path / "out2" / "again", "transformer")
    fused = read_component_weights(tmp_path / "out" / "fused", "transformer")
    assert read.keys() == fused.keys() and all(torch.equal(read[k], fused[k]) for k in fused)
    assert read["x_embedder.weight"].shape == (32, FILL_IN_CHANNELS)


@pytest.mark.parametrize("pipeline_class", VARIANTS)
def test_a_grid_on_a_variant_is_refused_naming_it(tmp_path: Path, pipeline_class: str) -> None:
    _variant(tmp_path, pipeline_class)
    text = """\
        base: {path: variant}
        adapters: {style: builtin:tiny-flux/style}
        outputs: {grid: {kind: grid, path: g.png, prompts: [a cat], variants: [base, style]}}
        """
    assert messages(problems_of(tmp_path, text)) == [
        f"outputs.grid.kind: the base is a {pipeline_class}, which edits an input image: grids render "
        "from prompts only [build the fused pipeline and LoRA files here, and sample the edit model with "
        "its own images]"
    ]
