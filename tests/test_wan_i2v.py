"""Wan image-to-video bases (``WanImageToVideoPipeline``), derived from the T2V built-ins.

- Wan 2.1 I2V-14B-like (image cross-attention ``attn2.add_k_proj``/``add_v_proj``, image embedder, a
  CLIP vision ``image_encoder``): an I2V LoRA in the musubi layout (``cross_attn.k_img``, ``img_emb``)
  and in the PEFT layout, plus T2V LoRAs, fuse on both executors bit-identically and equal
  W + s·Σ wᵢ(αᵢ/rᵢ)BᵢAᵢ read from the files by ``tests.helpers.dit_math``; the image encoder and its
  processor are copied untouched; the single file reads back through diffusers' ``from_single_file``;
  the merged LoRA file reloads into diffusers' I2V pipeline with every module applied.
- A T2V LoRA on an I2V base is what diffusers makes of it (``_maybe_expand_t2v_lora_for_i2v`` gives it
  zero ``add_k_proj``/``add_v_proj`` factors: the image cross-attention is unchanged); an I2V LoRA on
  a T2V base is refused naming the modules the base lacks (diffusers would drop them with a warning).
- Wan 2.2 I2V-A14B-like (two experts, no image encoder): each expert gets its LoRAs, one single file per
  expert.
- A grid on an I2V base is refused at compile time: the pipeline needs an input image.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
from safetensors.torch import load_file

from lorarecipe.builtin.dit_loras import make_original_lora
from lorarecipe.builtin.loras import make_peft_lora
from lorarecipe.builtin.materialize import builtin_lora_path
from lorarecipe.families import FAMILIES
from lorarecipe.runner.pipeline.adapters import load_adapter
from tests.helpers.dit_math import dit_deltas
from tests.helpers.lora_math import read_component_weights
from tests.helpers.recipes import build_text, messages, problems_of
from tests.helpers.wan_i2v import wan21_i2v, wan22_i2v
from tests.test_dit_fuse import Terms, _add, _wan_block_weight
from tests.test_dit_outputs import _deltas
from tests.test_streaming import _both

_I2V_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ffn.net.0.proj", "ffn.net.2")


@pytest.fixture(scope="module")
def wan21(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Wan 2.1 I2V-like base with two I2V LoRAs beside it: ``musubi.safetensors`` (every Linear the
    Wan table names, original layout, r8 α4) and ``peft.safetensors`` (attention incl. the image
    cross-attention, and feed-forward, r4 α8)."""
    root = tmp_path_factory.mktemp("wan21-i2v")
    wan21_i2v(root / "i2v")
    pipe = WanImageToVideoPipeline.from_pretrained(str(root / "i2v"))
    make_original_lora(
        FAMILIES["wan"], pipe, root / "musubi.safetensors", layout="kohya", rank=8, alpha=4.0, seed=81,
        select=lambda name: True,
    )  # fmt: skip
    make_peft_lora(pipe, root / "peft.safetensors", rank=4, alpha=8.0, seed=82, targets=_I2V_TARGETS)
    return root


def _copy_inputs(source: Path, folder: Path) -> None:
    """The module's base and LoRAs into a test's folder (recipes read inside their folder only)."""
    shutil.copytree(source / "i2v", folder / "i2v")
    for name in ("musubi.safetensors", "peft.safetensors"):
        shutil.copy(source / name, folder / name)


def _fused(folder: Path, base: Path, terms: Terms, components: tuple[str, ...]) -> None:
    """fused == base + Σ terms (float64, atol 1e-5), bit-equal elsewhere; every other component's
    tensors (VAE, text and image encoders) bit-equal too."""
    for component in components:
        original, fused = read_component_weights(base, component), read_component_weights(folder, component)
        assert fused.keys() == original.keys()
        for key, tensor in fused.items():
            if (component, key) in terms:
                expected = original[key].double() + terms[(component, key)]
                torch.testing.assert_close(tensor.double(), expected, atol=1e-5, rtol=0, msg=key)
            else:
                assert torch.equal(tensor, original[key]), f"{component}.{key} changed"


def test_wan21_i2v_loras_and_t2v_loras_fuse_exactly(tmp_path: Path, wan21: Path) -> None:
    _copy_inputs(wan21, tmp_path)
    spec = {"blocks": {"0": 0.5, "1": 1.5}, "default": 0.25}
    _both(
        tmp_path,
        """\
        base: {path: i2v}
        adapters:
          musubi: {file: musubi.safetensors}
          peft: {file: peft.safetensors}
          t2v: builtin:tiny-wan/style
          t2v_kohya: builtin:tiny-wan/detail
        set_adapters:
          adapters:
            musubi: {transformer: {blocks: {0: 0.5, 1: 1.5}, default: 0.25}}
            peft: -0.6
            t2v: 0.7
            t2v_kohya: 0.4
        fuse: {lora_scale: 0.9}
        outputs:
          fused: {kind: pipeline, path: fused}
          single: {kind: single_file, path: i2v.safetensors}
        """,
    )
    base = read_component_weights(wan21 / "i2v", "transformer")
    terms: Terms = {}
    musubi = dit_deltas(wan21 / "musubi.safetensors", "wan", base)
    _add(terms, "transformer", musubi, lambda key: 0.9 * _wan_block_weight(spec, key))
    _add(terms, "transformer", dit_deltas(wan21 / "peft.safetensors", "wan", base), 0.9 * -0.6)
    _add(terms, "transformer", dit_deltas(builtin_lora_path("tiny-wan/style"), "wan", base), 0.9 * 0.7)
    _add(terms, "transformer", dit_deltas(builtin_lora_path("tiny-wan/detail"), "wan", base), 0.9 * 0.4)
    for module in (
        "blocks.1.attn2.add_k_proj",
        "blocks.0.attn2.add_v_proj",
        "condition_embedder.image_embedder.ff.net.0.proj",
    ):
        assert ("transformer", f"{module}.weight") in terms, module
    components = ("transformer", "image_encoder", "text_encoder", "vae")
    _fused(tmp_path / "stream" / "fused", wan21 / "i2v", terms, components)
    for route in ("pipe", "stream"):
        out = tmp_path / route / "fused"
        assert json.loads((out / "model_index.json").read_text())["_class_name"] == "WanImageToVideoPipeline"
        for config in ("image_processor/preprocessor_config.json", "image_encoder/config.json"):
            assert (out / config).read_bytes() == (wan21 / "i2v" / config).read_bytes(), (route, config)
    model = WanTransformer3DModel.from_single_file(
        str(tmp_path / "stream" / "i2v.safetensors"),
        config=str(tmp_path / "stream" / "fused"),
        subfolder="transformer",
        local_files_only=True,
    )
    fused = read_component_weights(tmp_path / "stream" / "fused", "transformer")
    state = model.state_dict()
    assert state.keys() == fused.keys() and all(torch.equal(state[k], fused[k]) for k in fused)
    single = load_file(str(tmp_path / "stream" / "i2v.safetensors"))
    assert "blocks.0.cross_attn.k_img.weight" in single and "img_emb.proj.1.weight" in single


def test_wan21_i2v_merged_lora_files_reload_with_every_module(tmp_path: Path, wan21: Path) -> None:
    """A ``cat`` merge (exact: w₁Δ₁ + w₂Δ₂) of the two I2V LoRAs, in the diffusers and the kohya/ComfyUI
    layouts: each reloads into the I2V pipeline with every module applied, image cross-attention too."""
    _copy_inputs(wan21, tmp_path)
    build_text(
        tmp_path,
        textwrap.dedent(
            """\
            base: {path: i2v}
            adapters: {musubi: {file: musubi.safetensors}, peft: {file: peft.safetensors}}
            merges: {both: {method: cat, adapters: {musubi: 0.6, peft: -1.2}}}
            outputs:
              diffusers: {kind: lora, adapter: both, path: d}
              kohya: {kind: lora, adapter: both, path: k, layout: kohya}
            """
        ),
    )
    base = read_component_weights(wan21 / "i2v", "transformer")
    expected: dict[str, torch.Tensor] = {}
    for name, weight in (("musubi", 0.6), ("peft", -1.2)):
        for key, delta in dit_deltas(wan21 / f"{name}.safetensors", "wan", base).items():
            expected[key] = expected.get(key, torch.zeros_like(delta)) + weight * delta
    assert "blocks.0.attn2.add_k_proj.weight" in expected
    pipe = WanImageToVideoPipeline.from_pretrained(str(wan21 / "i2v"))
    for adapter, path in (
        ("d", tmp_path / "out" / "d" / "pytorch_lora_weights.safetensors"),
        ("k", tmp_path / "out" / "k" / "both.safetensors"),
    ):
        load_adapter(pipe, adapter, path, "wan")  # refuses any module diffusers would skip
        loaded = _deltas(pipe.transformer, adapter)
        assert set(loaded) == set(expected), adapter
        for key, delta in expected.items():
            torch.testing.assert_close(loaded[key], delta, atol=1e-6, rtol=0, msg=f"{adapter} {key}")


@pytest.fixture(scope="module")
def wan22(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wan22_i2v(tmp_path_factory.mktemp("wan22-i2v") / "i2v")


def test_wan22_i2v_experts_each_get_their_loras(tmp_path: Path, wan22: Path) -> None:
    """Wan 2.2 I2V-A14B has no image cross-attention: the T2V expert LoRAs apply as on T2V, one single
    file per expert."""
    shutil.copytree(wan22, tmp_path / "i2v")
    _both(
        tmp_path,
        """\
        base: {path: i2v}
        adapters:
          style: {builtin: tiny-wan22/style, load_into: [transformer, transformer_2]}
          low: {builtin: tiny-wan22/low, load_into: [transformer_2]}
        set_adapters: {adapters: {style: {transformer: 0.5, transformer_2: 0.8}, low: -0.7}}
        fuse: {lora_scale: 0.9}
        outputs:
          fused: {kind: pipeline, path: fused}
          high_file: {kind: single_file, path: high_noise.safetensors}
          low_file: {kind: single_file, path: low_noise.safetensors, component: transformer_2}
        """,
    )
    high, low = read_component_weights(wan22, "transformer"), read_component_weights(wan22, "transformer_2")
    style = builtin_lora_path("tiny-wan22/style")
    terms: Terms = {}
    _add(terms, "transformer", dit_deltas(style, "wan", high), 0.9 * 0.5)
    _add(terms, "transformer_2", dit_deltas(style, "wan", low), 0.9 * 0.8)
    _add(terms, "transformer_2", dit_deltas(builtin_lora_path("tiny-wan22/low"), "wan", low), 0.9 * -0.7)
    _fused(tmp_path / "stream" / "fused", wan22, terms, ("transformer", "transformer_2", "text_encoder"))
    for file, component in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
        model = WanTransformer3DModel.from_single_file(
            str(tmp_path / "stream" / f"{file}.safetensors"),
            config=str(tmp_path / "stream" / "fused"),
            subfolder=component,
            local_files_only=True,
        )
        fused = read_component_weights(tmp_path / "stream" / "fused", component)
        state = model.state_dict()
        assert state.keys() == fused.keys() and all(torch.equal(state[k], fused[k]) for k in fused), file


def test_an_i2v_lora_on_a_base_without_image_cross_attention_is_refused(
    tmp_path: Path, wan21: Path, wan22: Path
) -> None:
    """diffusers' Wan loader would skip the image cross-attention modules with a warning; lorarecipe
    names both sides instead (a T2V base, or Wan 2.2 I2V-A14B, which has none)."""
    shutil.copy(wan21 / "musubi.safetensors", tmp_path / "i2v.safetensors")
    shutil.copytree(wan22, tmp_path / "i2v22")
    expected = (
        "adapters.i2v: the LoRA is a Wan image-to-video LoRA (6 modules of the image cross-attention, e.g. "
        "'blocks_0_cross_attn_k_img') but the base has no image cross-attention (a text-to-video model, or "
        "Wan 2.2 I2V-A14B): diffusers would skip those modules with a warning"
    )
    for base, into in (("builtin:tiny-wan", ""), ("{path: i2v22}", ", load_into: [transformer]")):
        text = f"""\
            base: {base}
            adapters: {{i2v: {{file: i2v.safetensors{into}}}}}
            fuse: {{adapters: [i2v]}}
            outputs: {{fused: {{kind: pipeline, path: fused}}}}
            """
        assert messages(problems_of(tmp_path, textwrap.dedent(text))) == [expected], base


def test_a_grid_on_an_i2v_base_is_refused_naming_the_input_image(tmp_path: Path, wan22: Path) -> None:
    shutil.copytree(wan22, tmp_path / "i2v")
    text = """\
        base: {path: i2v}
        adapters: {low: {builtin: tiny-wan22/low, load_into: [transformer_2]}}
        outputs: {grid: {kind: grid, path: g.png, prompts: [a cat], variants: [base, low]}}
        """
    assert messages(problems_of(tmp_path, textwrap.dedent(text))) == [
        "outputs.grid.kind: the base is a WanImageToVideoPipeline, which animates an input image "
        "(image-to-video): grids render from prompts only [build the fused pipeline and LoRA files here, "
        "and sample the image-to-video model with its own images]"
    ]
