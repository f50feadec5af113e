"""LyCORIS/DoRA files on FLUX.2 and Wan, applied by lorarecipe itself, against lycoris.functional.

Every file is written by ``tests.helpers.lycoris_files`` (random factors; each module's ΔW from
``lycoris.functional``, DoRA re-normalized with plain float64 loops), named as trainers name them:
kohya-flattened and LyCORIS-flattened diffusers names, PEFT/diffusers names, and the original BFL
(FLUX.2) and Wan layouts, written out here module by module (fused ``qkv`` rows, the final adaLN's
swapped halves). Both executors must write the same bits (``test_lycoris_fuse.both_routes``) and every
changed weight must equal W + s·ΔW (W + s·(W' − W) with DoRA), s = recipe weight × block weight ×
``lora_scale``; every other weight stays bit-equal. Wan 2.2 A14B: ``load_into`` puts a file's modules on
each expert named, with that expert's weights and blocks. A per-column DoRA on FLUX.2's fused qkv (three
diffusers weights) is a compile error, as on FLUX.1.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorarecipe.builtin.materialize import builtin_base_path
from tests.helpers.lycoris_files import (
    Module,
    adapter_metadata,
    add_dora,
    expected_weight,
    make_module,
    state_dict,
    weights_of,
)
from tests.test_lycoris_fuse import assert_fused, both_routes

pytest.importorskip("lycoris.functional")

LORA_SCALE = 0.8
LAYOUTS = {  # file layout -> (algorithm, DoRA axis of its first module)
    "kohya": ("lokr-decomposed", "row"),
    "lycoris": ("loha", "column"),
    "diffusers": ("lora", "row"),
}
BLOCK_PREFIX = {"tiny-flux2": "transformer_blocks.0.", "tiny-wan": "blocks.0."}


def _base(base: str, components: tuple[str, ...] = ("transformer",)) -> dict[str, dict[str, torch.Tensor]]:
    return {c: weights_of(builtin_base_path(base), c) for c in components}


@pytest.mark.parametrize("base", list(BLOCK_PREFIX))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lycoris_and_dora_in_diffusers_names_fuse_to_the_oracle_on_both_executors(
    base: str, layout: str, tmp_path: Path
) -> None:
    """LoKr/LoHa/LoRA + DoRA on a block's Linears, named as kohya, LyCORIS and PEFT name them."""
    weights = _base(base)["transformer"]
    linears = [
        k
        for k, v in weights.items()
        if k.startswith(BLOCK_PREFIX[base]) and k.endswith(".weight") and v.ndim == 2 and min(v.shape) >= 8
    ][:3]
    algorithm, dora = LAYOUTS[layout]
    modules = []
    for i, key in enumerate(linears):
        shape = tuple(weights[key].shape)
        module = make_module("transformer", key.removesuffix(".weight"), shape, algorithm, seed=800 + 10 * i)
        if i == 0:
            add_dora(module, dora, seed=805, peft=layout == "diffusers")
        modules.append(module)
    metadata = adapter_metadata(("transformer",), 2, 3.0) if layout == "diffusers" else {}
    save_file(state_dict(modules, layout), str(tmp_path / "lyco.safetensors"), metadata=metadata)
    text = f"""\
        base: builtin:{base}
        adapters: {{lyco: {{file: lyco.safetensors}}}}
        set_adapters: {{adapters: {{lyco: 0.7}}}}
        fuse: {{lora_scale: {LORA_SCALE}}}
        outputs: {{fused: {{kind: pipeline, path: fused}}}}
        """
    fused = both_routes(tmp_path, textwrap.dedent(text), ("transformer",))
    expected = {
        ("transformer", f"{m.module}.weight"): expected_weight(
            weights[f"{m.module}.weight"], [(m, 0.7 * LORA_SCALE)]
        )
        for m in modules
    }
    assert len(expected) == 3
    assert_fused({"transformer": weights}, fused, expected)


_D, _S = "transformer_blocks", "single_transformer_blocks"
FLUX2_PARTS = {  # BFL module -> its diffusers parts, this test's own reading of the FLUX.2 layout
    "double_blocks.0.img_attn.qkv": [f"{_D}.0.attn.to_q", f"{_D}.0.attn.to_k", f"{_D}.0.attn.to_v"],
    "single_blocks.1.linear1": [f"{_S}.1.attn.to_qkv_mlp_proj"],
    "double_blocks.1.img_mlp.0": [f"{_D}.1.ff.linear_in"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],
}
FLUX2_BLOCKS = {"double_blocks": {0: 0.5, 1: 1.2}, "single_blocks": 0.8, "default": 0.3}


def _stacked_expected(
    base: dict[str, torch.Tensor], parts: list[str], module: Module, strength: float, swapped: bool
) -> dict[tuple[str, str], torch.Tensor]:
    """An original-layout module's fused weights: its parts stacked into the original weight (row halves
    swapped back where the original stores them swapped), the oracle applied, split again by rows."""
    stacked = torch.cat([base[f"{p}.weight"] for p in parts])
    if swapped:
        stacked = torch.cat(stacked.chunk(2)[::-1])
    fused = expected_weight(stacked, [(module, strength)])
    if swapped:
        fused = torch.cat(fused.chunk(2)[::-1])
    heights = [base[f"{p}.weight"].shape[0] for p in parts]
    return {("transformer", f"{p}.weight"): t for p, t in zip(parts, fused.split(heights), strict=True)}


def test_flux2_bfl_names_fused_qkv_linear1_final_layer_and_blocks(tmp_path: Path) -> None:
    """kohya/musubi BFL names (a LoKr over the fused qkv with a per-row DoRA, narrowed onto to_q/k/v by
    rows; linear1; the final adaLN with swapped halves) and an ai-toolkit ``diffusion_model.`` LoKr,
    with FLUX.2 per-block weights."""
    weights = _base("tiny-flux2")["transformer"]
    shape_of = {
        bfl: (sum(weights[f"{p}.weight"].shape[0] for p in parts), 32) for bfl, parts in FLUX2_PARTS.items()
    }
    algorithms = ("lokr-decomposed", "loha", "lora", "lokr-full")
    bfl = {
        name: make_module("transformer", name, shape_of[name], algorithm, seed=900 + 10 * i)
        for i, (name, algorithm) in enumerate(zip(FLUX2_PARTS, algorithms, strict=True))
    }
    add_dora(bfl["double_blocks.0.img_attn.qkv"], "row", seed=905)
    tensors = {
        f"lora_unet_{name.replace('.', '_')}.{suffix}": tensor
        for name, module in bfl.items()
        for suffix, tensor in module.tensors.items()
    }
    save_file(tensors, str(tmp_path / "bfl.safetensors"))
    aitk = make_module("transformer", "proj", (32, 32), "lokr-decomposed", seed=960)
    save_file(
        {f"diffusion_model.double_blocks.1.txt_attn.proj.{k}": v for k, v in aitk.tensors.items()},
        str(tmp_path / "aitk.safetensors"),
    )
    text = f"""\
        base: builtin:tiny-flux2
        adapters: {{f: {{file: bfl.safetensors}}, a: {{file: aitk.safetensors}}}}
        set_adapters:
          adapters:
            f: {{transformer: {json.dumps(FLUX2_BLOCKS)}}}
            a: -0.7
        fuse: {{lora_scale: 0.9}}
        outputs: {{fused: {{kind: pipeline, path: fused}}}}
        """
    fused = both_routes(tmp_path, textwrap.dedent(text), ("transformer",))
    block = {"double_blocks.0": 0.5, "double_blocks.1": 1.2, "single_blocks": 0.8, "final_layer": 0.3}
    expected: dict[tuple[str, str], torch.Tensor] = {}
    for name, module in bfl.items():
        weight = next(w for prefix, w in block.items() if name.startswith(prefix))
        swapped = name.startswith("final_layer")
        expected.update(_stacked_expected(weights, FLUX2_PARTS[name], module, weight * 0.9, swapped))
    key = f"{_D}.1.attn.to_add_out.weight"
    expected[("transformer", key)] = expected_weight(weights[key], [(aitk, -0.7 * 0.9)])
    assert len(expected) == 7
    assert_fused({"transformer": weights}, fused, expected)


WAN_ORIGINAL = {  # Wan module -> its diffusers module, this test's own reading of the Wan layout
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
    "blocks.1.cross_attn.k": "blocks.1.attn2.to_k",
    "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj",
}


def _wan_original_file(tmp_path: Path, weights: dict[str, torch.Tensor], seed: int) -> dict[str, Module]:
    """musubi-tuner's kohya names (a LoKr) and ComfyUI's ``diffusion_model.`` names (a LoHa with a
    per-column ``dora_scale``, a LoRA) in one file; returns diffusers module -> its test module."""
    algorithms = ("lokr-decomposed", "loha", "lora")
    modules: dict[str, Module] = {}
    tensors: dict[str, torch.Tensor] = {}
    for i, ((original, diffusers), algorithm) in enumerate(
        zip(WAN_ORIGINAL.items(), algorithms, strict=True)
    ):
        shape = tuple(weights[f"{diffusers}.weight"].shape)
        module = make_module("transformer", original, shape, algorithm, seed=seed + 10 * i)
        if i == 1:
            add_dora(module, "column", seed=seed + 5)
        stem = "lora_unet_" + original.replace(".", "_") if i == 0 else f"diffusion_model.{original}"
        tensors.update({f"{stem}.{suffix}": t for suffix, t in module.tensors.items()})
        modules[diffusers] = module
    save_file(tensors, str(tmp_path / f"wan{seed}.safetensors"))
    return modules


def test_wan_original_names_and_dora_fuse_to_the_oracle(tmp_path: Path) -> None:
    """Wan LyCORIS/DoRA files in the original names (musubi, ComfyUI) with per-block weights: the DoRA
    magnitude diffusers would drop is applied."""
    weights = _base("tiny-wan")["transformer"]
    modules = _wan_original_file(tmp_path, weights, seed=1000)
    text = """\
        base: builtin:tiny-wan
        adapters: {w: {file: wan1000.safetensors}}
        set_adapters: {adapters: {w: {transformer: {blocks: {0: 0.5, 1: 1.5}}}}}
        fuse: {lora_scale: 0.9}
        outputs: {fused: {kind: pipeline, path: fused}}
        """
    fused = both_routes(tmp_path, textwrap.dedent(text), ("transformer",))
    expected = {
        ("transformer", f"{name}.weight"): expected_weight(
            weights[f"{name}.weight"], [(module, (0.5 if name.startswith("blocks.0.") else 1.5) * 0.9)]
        )
        for name, module in modules.items()
    }
    assert_fused({"transformer": weights}, fused, expected)


def test_wan22_load_into_puts_lycoris_modules_on_each_expert(tmp_path: Path) -> None:
    """Wan 2.2 A14B: one file into the high-noise expert only, one into both, each expert with its own
    weights (blocks on transformer_2); the other expert's weights stay bit-equal."""
    experts = ("transformer", "transformer_2")
    base = _base("tiny-wan22", experts)
    high = _wan_original_file(tmp_path, base["transformer"], seed=1100)
    both = _wan_original_file(tmp_path, base["transformer"], seed=1200)
    text = """\
        base: builtin:tiny-wan22
        adapters:
          high: {file: wan1100.safetensors, load_into: [transformer]}
          both: {file: wan1200.safetensors, load_into: [transformer, transformer_2]}
        set_adapters:
          adapters:
            high: 0.6
            both: {transformer: 1.1, transformer_2: {blocks: {0: 0.4, 1: 1.3}}}
        fuse: {lora_scale: 0.9}
        outputs: {fused: {kind: pipeline, path: fused}}
        """
    fused = both_routes(tmp_path, textwrap.dedent(text), experts)
    expected: dict[tuple[str, str], torch.Tensor] = {}
    for name in WAN_ORIGINAL.values():
        key = f"{name}.weight"
        expected[("transformer", key)] = expected_weight(
            base["transformer"][key], [(high[name], 0.6 * 0.9), (both[name], 1.1 * 0.9)]
        )
        block = 0.4 if name.startswith("blocks.0.") else 1.3
        expected[("transformer_2", key)] = expected_weight(
            base["transformer_2"][key], [(both[name], block * 0.9)]
        )
    assert len(expected) == 6
    assert_fused(base, fused, expected)


def test_flux2_dora_per_column_on_the_fused_qkv_is_refused(tmp_path: Path) -> None:
    """A column norm of FLUX.2's fused qkv spans to_q, to_k and to_v, three weights in diffusers: a
    compile error naming the module, not a split that would normalize each part alone."""
    from tests.helpers.recipes import messages, problems_of

    module = make_module("transformer", "qkv", (96, 32), "lora", seed=1)
    add_dora(module, "column", seed=2)
    save_file(
        {f"lora_unet_double_blocks_0_img_attn_qkv.{k}": v for k, v in module.tensors.items()},
        str(tmp_path / "d.safetensors"),
    )
    text = """\
        base: builtin:tiny-flux2
        adapters: {d: {file: d.safetensors}}
        fuse: {adapters: [d]}
        outputs: {fused: {kind: pipeline, path: fused}}
        """
    found = messages(problems_of(tmp_path, textwrap.dedent(text)))
    assert len(found) == 1, found
    assert found[0].startswith("adapters.d: 1 of 1 modules cannot be applied: ")
    assert (
        "lora_unet_double_blocks_0_img_attn_qkv: DoRA normalizes each input column of the fused module over "
        "all 3 parts, which are separate diffusers weights here" in found[0]
    )
