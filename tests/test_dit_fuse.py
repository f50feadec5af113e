"""FLUX.2 and Wan fused checkpoints on the built-ins: both executors, against independent math.

For each family, one recipe with every LoRA layout the built-ins have, weights (one negative) and a
``lora_scale``: the fused folder equals W + s·Σ wᵢ(αᵢ/rᵢ)BᵢAᵢ read from the files by
``tests.helpers.dit_math`` (its own tables, float64), nothing else changes, and the streaming executor
is bit-identical to the pipeline route (float32). Per-block weights are recomputed here from the spec
(``tests.test_flux_fuse._block_weight``: FLUX.2 has FLUX.1's block names; Wan's ``blocks.N`` below).
Wan 2.2 A14B: each expert gets exactly the LoRAs ``load_into`` puts there, with its own weights and
blocks; a single file per expert reads back through diffusers' ``from_single_file`` bit for bit; the
factor cache tells ``load_into`` apart. A bfloat16 Wan base streams within half an ulp of exact.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline, Flux2Transformer2DModel, WanTransformer3DModel
from safetensors.torch import load_file

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.compiler import compile_recipe
from lorarecipe.recipe.load import load_recipe
from tests.helpers.dit_math import dit_deltas
from tests.helpers.lora_math import read_component_weights
from tests.helpers.recipes import messages, problems_of, write_recipe
from tests.test_flux_fuse import _block_weight
from tests.test_streaming import _both, _spacing, _stream

Terms = dict[tuple[str, str], torch.Tensor]


def _weights(base: str, component: str = "transformer") -> dict[str, torch.Tensor]:
    return read_component_weights(builtin_base_path(base), component)


def _add(terms: Terms, component: str, deltas: dict[str, torch.Tensor], weight: Any) -> None:
    """terms[(component, key)] += weight(key) · delta (weight: a number or a function of the key)."""
    for key, delta in deltas.items():
        w = weight(key) if callable(weight) else weight
        terms[(component, key)] = terms.get((component, key), torch.zeros_like(delta)) + w * delta


def _check_fused(folder: Path, base: str, terms: Terms, components: tuple[str, ...]) -> None:
    """fused == base + Σ terms where a term exists (float64 → atol 1e-5), bit-equal elsewhere."""
    for component in components:
        original = _weights(base, component)
        fused = read_component_weights(folder, component)
        assert fused.keys() == original.keys()
        for key, tensor in fused.items():
            if (component, key) in terms:
                expected = original[key].double() + terms[(component, key)]
                torch.testing.assert_close(
                    tensor.double(), expected, atol=1e-5, rtol=0, msg=f"{component}.{key}"
                )
            else:
                assert torch.equal(tensor, original[key]), f"{component}.{key} changed"


def _wan_block_weight(spec: dict[str, Any], module: str) -> float:
    """This test's reading of a Wan per-block spec: ``blocks`` are diffusers' ``blocks.N``."""
    default = float(spec.get("default", 1.0))
    found = re.match(r"blocks\.(\d+)\.", module)
    group = spec.get("blocks") if found else None
    if group is None:
        return default
    if not isinstance(group, dict):
        return float(group)
    for key, weight in group.items():
        low, _, high = str(key).partition("-")
        if int(low) <= int(found[1]) <= int(high or low):  # type: ignore[index]
            return float(weight)
    return default


# ---- FLUX.2 ----------------------------------------------------------------------------------------


def test_flux2_klein_every_layout_and_single_file(tmp_path: Path) -> None:
    """PEFT, kohya/musubi (fused qkv, linear1/2, embedders, shared modulation, the swapped final
    adaLN) and ai-toolkit on Klein; the BFL single file reads back through diffusers' reader."""
    reports = _both(
        tmp_path,
        """\
        base: builtin:tiny-flux2-klein
        adapters:
          style: builtin:tiny-flux2-klein/style
          detail: builtin:tiny-flux2-klein/detail
          aitk: builtin:tiny-flux2-klein/aitk
        set_adapters: {adapters: {style: 0.7, detail: -0.6, aitk: 1.3}}
        fuse: {lora_scale: 0.8}
        outputs:
          fused: {kind: pipeline, path: fused}
          single: {kind: single_file, path: klein.safetensors}
        """,
    )
    base = _weights("tiny-flux2-klein")
    terms: Terms = {}
    for name, weight in (("style", 0.7), ("detail", -0.6), ("aitk", 1.3)):
        _add(
            terms,
            "transformer",
            dit_deltas(builtin_lora_path(f"tiny-flux2-klein/{name}"), "flux2", base),
            0.8 * weight,
        )
    assert ("transformer", "norm_out.linear.weight") in terms  # the swapped final layer
    assert ("transformer", "double_stream_modulation_img.linear.weight") in terms  # shared modulation
    _check_fused(tmp_path / "stream" / "fused", "tiny-flux2-klein", terms, ("transformer",))
    assert reports["fused"].changed == len(terms) and reports["fused"].max_abs_diff_vs_fp32 == 0.0
    model = Flux2Transformer2DModel.from_single_file(
        str(tmp_path / "stream" / "klein.safetensors"),
        config=str(tmp_path / "stream" / "fused"),
        subfolder="transformer",
        local_files_only=True,
    )
    fused = read_component_weights(tmp_path / "stream" / "fused", "transformer")
    state = model.state_dict()
    assert state.keys() == fused.keys() and all(torch.equal(state[k], fused[k]) for k in fused)
    single = load_file(str(tmp_path / "stream" / "klein.safetensors"))
    assert "double_blocks.0.img_attn.qkv.weight" in single and "single_stream_modulation.lin.weight" in single


def test_flux2_dev_per_block_weights_and_bare_peft(tmp_path: Path) -> None:
    """FLUX.2 dev (guidance embedding): per-block weights with FLUX.1's syntax on double/single blocks,
    and a bare-PEFT (``base_model.model.``) file, which FLUX.2's loader reads."""
    style = {"double_blocks": {"0": 0.5, "1": -0.3}, "single_blocks": {"1": 2.0}, "default": 0.25}
    detail = {"double_blocks": 1.5, "single_blocks": {"0-1": 0.0}}
    _both(
        tmp_path,
        """\
        base: builtin:tiny-flux2
        adapters:
          style: builtin:tiny-flux2/style
          detail: builtin:tiny-flux2/detail
          raw: builtin:tiny-flux2/raw
        set_adapters:
          adapters:
            style: {transformer: {double_blocks: {0: 0.5, 1: -0.3}, single_blocks: {1: 2.0}, default: 0.25}}
            detail: {transformer: {double_blocks: 1.5, single_blocks: {0-1: 0.0}}}
            raw: 0.9
        fuse: {lora_scale: 0.7}
        outputs: {fused: {kind: pipeline, path: fused}}
        """,
    )
    base = _weights("tiny-flux2")
    terms: Terms = {}
    for name, spec in (("style", style), ("detail", detail)):
        deltas = dit_deltas(builtin_lora_path(f"tiny-flux2/{name}"), "flux2", base)
        _add(terms, "transformer", deltas, lambda key, spec=spec: 0.7 * _block_weight(spec, key))
    _add(terms, "transformer", dit_deltas(builtin_lora_path("tiny-flux2/raw"), "flux2", base), 0.7 * 0.9)
    assert ("transformer", "time_guidance_embed.guidance_embedder.linear_1.weight") in terms
    _check_fused(tmp_path / "stream" / "fused", "tiny-flux2", terms, ("transformer",))


# ---- Wan ----------------------------------------------------------------------------------------------


def test_wan21_every_layout_per_block_and_single_file(tmp_path: Path) -> None:
    """PEFT, musubi (blocks, embedders, head) and ComfyUI (``diffusion_model.``, lora_down/up + alpha)."""
    spec = {"blocks": {"0": 0.5, "1": 1.5}, "default": 0.25}
    _both(
        tmp_path,
        """\
        base: builtin:tiny-wan
        adapters:
          style: builtin:tiny-wan/style
          detail: builtin:tiny-wan/detail
          comfy: builtin:tiny-wan/comfy
        set_adapters:
          adapters: {style: 0.7, detail: {transformer: {blocks: {0: 0.5, 1: 1.5}, default: 0.25}}, comfy: -0.8}
        fuse: {lora_scale: 0.9}
        outputs:
          fused: {kind: pipeline, path: fused}
          single: {kind: single_file, path: wan.safetensors}
        """,
    )
    base = _weights("tiny-wan")
    terms: Terms = {}
    _add(terms, "transformer", dit_deltas(builtin_lora_path("tiny-wan/style"), "wan", base), 0.9 * 0.7)
    detail = dit_deltas(builtin_lora_path("tiny-wan/detail"), "wan", base)
    _add(terms, "transformer", detail, lambda key: 0.9 * _wan_block_weight(spec, key))
    _add(terms, "transformer", dit_deltas(builtin_lora_path("tiny-wan/comfy"), "wan", base), 0.9 * -0.8)
    assert ("transformer", "condition_embedder.time_proj.weight") in terms and (
        "transformer",
        "proj_out.weight",
    ) in terms
    _check_fused(tmp_path / "stream" / "fused", "tiny-wan", terms, ("transformer",))
    single = load_file(str(tmp_path / "stream" / "wan.safetensors"))
    assert (
        "blocks.0.self_attn.q.weight" in single
        and "head.modulation" in single
        and "blocks.0.norm3.weight" in single
    )


WAN22 = """\
    base: builtin:tiny-wan22
    adapters:
      style: {builtin: tiny-wan22/style, load_into: [transformer, transformer_2]}
      high: {builtin: tiny-wan22/high, load_into: [transformer]}
      low: {builtin: tiny-wan22/low, load_into: [transformer_2]}
    set_adapters:
      adapters:
        style: {transformer: {blocks: {0: 0.5, 1: 1.2}}, transformer_2: 0.8}
        high: 1.1
        low: {transformer_2: {blocks: -0.7, default: 0.5}}
    fuse: {lora_scale: 0.9}
    outputs:
      fused: {kind: pipeline, path: fused}
      high_file: {kind: single_file, path: high_noise.safetensors}
      low_file: {kind: single_file, path: low_noise.safetensors, component: transformer_2}
    """


def test_wan22_two_experts_each_get_their_loras(tmp_path: Path) -> None:
    reports = _both(tmp_path, WAN22)
    terms: Terms = {}
    high, low = _weights("tiny-wan22"), _weights("tiny-wan22", "transformer_2")
    style = builtin_lora_path("tiny-wan22/style")
    blocks = {"blocks": {"0": 0.5, "1": 1.2}}
    _add(
        terms, "transformer", dit_deltas(style, "wan", high), lambda key: 0.9 * _wan_block_weight(blocks, key)
    )
    _add(terms, "transformer_2", dit_deltas(style, "wan", low), 0.9 * 0.8)
    _add(terms, "transformer", dit_deltas(builtin_lora_path("tiny-wan22/high"), "wan", high), 0.9 * 1.1)
    low_blocks = {"blocks": -0.7, "default": 0.5}
    _add(
        terms,
        "transformer_2",
        dit_deltas(builtin_lora_path("tiny-wan22/low"), "wan", low),
        lambda key: 0.9 * _wan_block_weight(low_blocks, key),
    )
    assert ("transformer_2", "proj_out.weight") in terms and ("transformer", "proj_out.weight") not in terms
    _check_fused(tmp_path / "stream" / "fused", "tiny-wan22", terms, ("transformer", "transformer_2"))
    assert reports["fused"].components == ("transformer", "transformer_2")
    assert reports["low_file"].components == ("transformer_2",)
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


def test_wan22_load_into_is_part_of_the_factor_cache_key(tmp_path: Path) -> None:
    """The same file loaded into the other expert is a different adapter: the cache must not hand
    the first build's factors (on ``transformer``) to the second (on ``transformer_2``)."""
    for index, expert in enumerate(("transformer", "transformer_2")):
        folder = tmp_path / expert
        folder.mkdir()
        text = f"""\
            base: builtin:tiny-wan22
            adapters: {{high: {{builtin: tiny-wan22/high, load_into: [{expert}]}}}}
            fuse: {{adapters: [high]}}
            outputs: {{fused: {{kind: pipeline, path: fused}}}}
            """
        loaded = load_recipe(write_recipe(folder, textwrap.dedent(text)))
        report = _stream(folder, compile_recipe(loaded), loaded.text)["fused"]
        assert report.components == (expert,), index
        other = "transformer_2" if expert == "transformer" else "transformer"
        fused = read_component_weights(folder / "stream" / "fused", other)
        assert all(torch.equal(t, _weights("tiny-wan22", other)[k]) for k, t in fused.items())


def test_wan_bfloat16_base_keeps_diffusers_float32_modules(tmp_path: Path) -> None:
    """A bfloat16 Wan base: diffusers keeps the time embedder, norms and modulation in float32 when it
    loads it, so both executors write those in float32, fused in float32 bit for bit alike; every
    bfloat16 tensor of the stream is within half an ulp of the exact value (plus the float32 sum's own
    rounding, which decides at a rounding midpoint)."""
    pipe = DiffusionPipeline.from_pretrained(str(builtin_base_path("tiny-wan")), dtype=torch.bfloat16)
    pipe.save_pretrained(tmp_path / "base")
    stored = read_component_weights(tmp_path / "base", "transformer")
    kept = {k for k, t in stored.items() if t.dtype == torch.float32}
    assert "condition_embedder.time_embedder.linear_1.weight" in kept and "scale_shift_table" in kept
    _both(
        tmp_path,
        """\
        base: {path: base}
        adapters: {detail: {builtin: tiny-wan/detail}, style: {builtin: tiny-wan/style}}
        set_adapters: {adapters: {detail: 0.8, style: -0.5}}
        fuse: {lora_scale: 1.0}
        outputs: {fused: {kind: pipeline, path: fused}, single: {kind: single_file, path: wan.safetensors}}
        """,
        identical=False,
    )
    piped = read_component_weights(tmp_path / "pipe" / "fused", "transformer")
    streamed = read_component_weights(tmp_path / "stream" / "fused", "transformer")
    assert {k: t.dtype for k, t in piped.items()} == {k: t.dtype for k, t in streamed.items()}
    deltas = dit_deltas(builtin_lora_path("tiny-wan/detail"), "wan", stored)
    style = dit_deltas(builtin_lora_path("tiny-wan/style"), "wan", stored)
    fused_kept = [k for k in deltas if k in kept]
    assert fused_kept  # the time embedder carries a LoRA: fused in float32 by both
    for key in fused_kept:
        assert streamed[key].dtype == torch.float32 and torch.equal(streamed[key], piped[key]), key
    for key in set(deltas) | set(style):
        exact = stored[key].double() + 0.8 * deltas.get(key, 0) - 0.5 * style.get(key, 0)  # type: ignore[operator]
        if key not in kept:
            error = (streamed[key].double() - exact).abs()  # + float32 arithmetic at a rounding midpoint
            bound = _spacing(exact.abs(), torch.bfloat16) / 2 + exact.abs() * 2.0**-20
            assert bool((error <= bound).all()), key
    single = load_file(str(tmp_path / "stream" / "wan.safetensors"))
    assert single["time_embedding.0.weight"].dtype == torch.float32
    assert single["blocks.0.self_attn.q.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            "adapters: {a: builtin:tiny-wan22/high}\nfuse: {adapters: [a]}",
            "the base has two experts (transformer, transformer_2: high-noise and low-noise steps)",
        ),
        (
            "adapters: {a: {builtin: tiny-wan22/high, load_into: [transformer]}}\n"
            "set_adapters: {adapters: {a: {transformer_2: 0.5}}}",
            "'a' is loaded into transformer only, not transformer_2: diffusers would ignore this weight",
        ),
        (
            "adapters: {a: {builtin: tiny-wan22/style, load_into: [transformer, transformer_2]}}\n"
            "outputs: {l: {kind: lora, adapter: a, path: l}}",
            "'a' is loaded into both experts (transformer, transformer_2) and a LoRA file holds one",
        ),
        (
            "adapters: {a: {builtin: tiny-wan22/low, load_into: [transformer_2]}}\n"
            "set_adapters: {adapters: {a: {transformer_2: {blocks: {0-2: 1.0}}}}}",
            "block 2 is out of range: the model has 2 blocks (0-1)",
        ),
        (
            "adapters: {a: {builtin: tiny-wan22/low, load_into: [transformer_2]}}\nfuse: {adapters: [a]}\n"
            "outputs: {f: {kind: single_file, path: f.safetensors}}",
            "the fuse changes transformer_2, but no output writes it (a single file holds one expert)",
        ),
        (
            "adapters: {a: {builtin: tiny-wan22/low, load_into: [transformer_2]}}\n"
            "outputs: {g: {kind: grid, path: g.png, prompts: [a cat], size: 72, variants: [base, a]}}",
            "outputs.g.size: Wan renders sizes that are multiples of 16, got 72",
        ),
    ],
)
def test_wan22_expert_mistakes_are_located_errors(tmp_path: Path, recipe: str, message: str) -> None:
    text = "base: builtin:tiny-wan22\n" + recipe
    if "outputs:" not in text:
        text += "\noutputs: {l: {kind: lora, adapter: a, path: l}}"
    found = messages(problems_of(tmp_path, text))
    assert any(message in m for m in found), found
