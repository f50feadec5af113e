"""LyCORIS (LoCon, LoHa, LoKr) and DoRA adapters fused by both executors, against independent oracles.

Each module's ΔW comes from ``lycoris.functional`` (the trainers' own rebuild) and DoRA from plain
float64 torch loops (``tests/helpers/lycoris_files.py``); names are mapped by the tests' own tables
(kohya flattening, SDXL's SGM block numbering, FLUX.1's BFL layout written out below); per-block UNet
weights come from diffusers' own ``set_adapters`` on PEFT layers. Every build runs on both executors:
the streamed checkpoint must be bit-identical to the pipeline route's (float32), and every weight must
equal the oracle to float32 rounding; weights no adapter touches must be untouched.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from tests.helpers.lora_math import lora_deltas
from tests.helpers.lycoris_files import (
    Module,
    adapter_metadata,
    add_dora,
    expected_weight,
    make_module,
    state_dict,
    weights_of,
)
from tests.helpers.recipes import build_text, messages, problems_of

pytest.importorskip("lycoris.functional")

TOLERANCE = 2e-6  # float32 fuse vs float64 oracle, |W| ≲ 2
SD_COMPONENTS = ("unet", "text_encoder")


def both_routes(folder: Path, text: str, components: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Build ``text`` with the pipeline route and the stream; the fused folders must be bit-identical.
    Returns the fused weights per component."""
    build_text(folder, text, out="pipe", executor="diffusers")
    build_text(folder, text, out="stream", executor="streaming")
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for component in components:
        pipe, stream = (
            weights_of(folder / "pipe" / "fused", component),
            weights_of(folder / "stream" / "fused", component),
        )
        assert pipe.keys() == stream.keys()
        differ = [k for k in pipe if not torch.equal(pipe[k], stream[k])]
        assert not differ, f"{component}: streaming differs from the pipeline route in {differ[:5]}"
        fused[component] = pipe
    return fused


def assert_fused(
    base: dict[str, dict[str, torch.Tensor]],
    fused: dict[str, dict[str, torch.Tensor]],
    expected: dict[tuple[str, str], torch.Tensor],
) -> dict[tuple[str, str], float]:
    """Expected weights equal to TOLERANCE, every other weight untouched; returns each max difference."""
    diffs = {}
    for component, weights in fused.items():
        for key, tensor in weights.items():
            if (component, key) in expected:
                diffs[(component, key)] = float((tensor.double() - expected[(component, key)]).abs().max())
            else:
                assert torch.equal(tensor, base[component][key]), f"{component}.{key} changed"
    assert expected.keys() <= diffs.keys(), sorted(expected.keys() - diffs.keys())
    worst = max(diffs, key=diffs.__getitem__)
    assert diffs[worst] <= TOLERANCE, (worst, diffs[worst])
    return diffs


# ---------------------------------------------------------------------------------------------
# SD 1.x: every algorithm, in the kohya, LyCORIS and PEFT/diffusers layouts
# ---------------------------------------------------------------------------------------------

_A = "down_blocks.0.attentions.0.transformer_blocks.0."
SD_MODULES = [  # (component, module, weight shape, algorithm, DoRA axis)
    ("unet", _A + "attn1.to_q", (32, 32), "lora", "column"),
    ("unet", "down_blocks.0.attentions.0.proj_in", (32, 32, 1, 1), "lora", None),
    ("unet", "down_blocks.0.resnets.0.conv1", (32, 32, 3, 3), "locon-tucker", None),
    ("unet", _A + "ff.net.0.proj", (256, 32), "loha", "row"),
    ("unet", "down_blocks.0.resnets.0.conv2", (32, 32, 3, 3), "loha-tucker", None),
    ("unet", _A + "attn1.to_k", (32, 32), "lokr-full", None),
    ("unet", "down_blocks.1.resnets.0.conv2", (64, 64, 3, 3), "lokr-full", None),  # 4-D W2
    ("unet", _A + "attn1.to_v", (32, 32), "lokr-decomposed", "row"),
    ("unet", "down_blocks.1.resnets.0.conv1", (64, 32, 3, 3), "lokr-decomposed", None),  # flat W2
    ("unet", "mid_block.resnets.0.conv1", (64, 64, 3, 3), "lokr-tucker", None),
    ("text_encoder", "encoder.layers.0.mlp.fc1", (37, 32), "loha", None),
    ("text_encoder", "encoder.layers.1.self_attn.q_proj", (32, 32), "lokr-decomposed", "column"),
]


def sd_modules(layout: str) -> list[Module]:
    modules = []
    for i, (component, name, shape, algorithm, dora) in enumerate(SD_MODULES):
        module = make_module(component, name, shape, algorithm, seed=100 * i)
        if dora and (layout != "diffusers" or dora == "row"):  # PEFT's magnitude is per row only
            add_dora(module, dora, seed=100 * i + 50, peft=layout == "diffusers")
        if layout == "diffusers" and algorithm == "lokr-full":
            module.delta = module.delta * 1.5  # type: ignore[operator]  # PEFT's LoKr: always α/r (3/2)
        modules.append(module)
    return modules


@pytest.mark.parametrize("layout", ["kohya", "lycoris", "diffusers"])
def test_sd_every_algorithm_fuses_to_the_oracle_on_both_executors(tmp_path: Path, layout: str) -> None:
    modules = sd_modules(layout)
    metadata = adapter_metadata(SD_COMPONENTS, 2, 3.0) if layout == "diffusers" else {}
    save_file(state_dict(modules, layout), str(tmp_path / "lyco.safetensors"), metadata=metadata)
    mix = (
        "{lyco: {unet: 0.7, text_encoder: 0.4}, style: 0.6}"
        if layout == "kohya"
        else "{lyco: {unet: 0.7, text_encoder: 0.4}}"
    )
    text = f"""\
        base: builtin:tiny-sd
        adapters: {{lyco: {{file: lyco.safetensors}}, style: builtin:tiny-sd/style}}
        set_adapters: {{adapters: {mix}}}
        fuse: {{lora_scale: 0.8}}
        outputs: {{fused: {{kind: pipeline, path: fused}}}}
        """
    fused = both_routes(tmp_path, textwrap.dedent(text), SD_COMPONENTS)
    base_path = builtin_base_path("tiny-sd")
    base = {c: weights_of(base_path, c) for c in SD_COMPONENTS}
    strength = {"unet": 0.7 * 0.8, "text_encoder": 0.4 * 0.8}
    expected = {
        (m.component, f"{m.module}.weight"): expected_weight(
            base[m.component][f"{m.module}.weight"], [(m, strength[m.component])]
        )
        for m in modules
    }
    if layout == "kohya":  # the LoRA's terms come after the LyCORIS/DoRA ones
        for key, delta in lora_deltas(builtin_lora_path("tiny-sd/style"), base).items():
            start = expected.get(key, base[key[0]][key[1]].double())
            expected[key] = start + 0.6 * 0.8 * delta
    assert_fused(base, fused, expected)


def test_peft_saved_loha_lokr_and_dora_files_fuse_like_peft_merges(tmp_path: Path) -> None:
    """Files PEFT itself writes (diffusers' save_lora_weights with lora_adapter_metadata): fused at
    weight 1 they equal PEFT's own merge_and_unload of the same layers (PEFT's LoKr scales by α/r
    even for full factors; its DoRA normalizes each output row with no eps)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    configs = {
        "loha": LoHaConfig(r=4, alpha=6, target_modules=["to_q", "conv1"], init_weights=False),
        "lokr": LoKrConfig(r=8, alpha=6, target_modules=["to_k", "conv2"], init_weights=False),
        "dora": LoraConfig(
            r=4, lora_alpha=6, target_modules=["to_v", "proj_in"], init_lora_weights=False, use_dora=True
        ),
        "lokr-tucker": LoKrConfig(
            r=2,
            alpha=6,
            target_modules=["conv1"],
            init_weights=False,
            decompose_both=True,
            use_effective_conv2d=True,
        ),
        "loha-tucker": LoHaConfig(
            r=4, alpha=6, target_modules=["conv2"], init_weights=False, use_effective_conv2d=True
        ),
    }
    for name, config in configs.items():
        pipe = StableDiffusionPipeline.from_pretrained(builtin_base_path("tiny-sd"))
        unet = pipe.unet
        torch.manual_seed(1)
        inject_adapter_in_model(config, unet, adapter_name=name)
        with torch.no_grad():
            for key, param in unet.named_parameters():
                if "lora_magnitude_vector" in key:
                    param.copy_(torch.rand(param.shape) + 0.5)  # a trained magnitude, not ‖W‖
        layers = get_peft_model_state_dict(unet, adapter_name=name)
        folder = tmp_path / name
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict()
        )
        merged = {k: v.detach().clone() for k, v in _merged(unet, name).items()}
        assert len(merged) >= 4 and any(
            k.endswith(("conv1.weight", "conv2.weight", "proj_in.weight")) for k in merged
        )
        text = """\
            base: builtin:tiny-sd
            adapters: {a: {file: pytorch_lora_weights.safetensors}}
            fuse: {adapters: [a]}
            outputs: {fused: {kind: pipeline, path: fused}}
            """
        fused = both_routes(folder, textwrap.dedent(text), ("unet",))["unet"]
        worst = max(float((fused[k] - v).abs().max()) for k, v in merged.items())
        assert worst <= 1e-6, (name, worst)  # PEFT builds a k×k conv's DoRA product with conv2d


def _merged(unet: Any, name: str) -> dict[str, torch.Tensor]:
    """PEFT's merge of every layer of adapter ``name``: the base weights after merge_and_unload."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for module_name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer) and name in module.active_adapters:
            module.merge(adapter_names=[name])
            out[f"{module_name}.weight"] = module.get_base_layer().weight
    return out


# ---------------------------------------------------------------------------------------------
# SDXL: kohya's SGM block names, both text encoders, diffusers' UNet block weights
# ---------------------------------------------------------------------------------------------

SDXL_MODULES = [  # (kohya stem, component, diffusers module, shape, algorithm, DoRA axis)
    ("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q", "unet",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (64, 64), "loha", None),
    ("lora_unet_middle_block_1_proj_out", "unet", "mid_block.attentions.0.proj_out", (64, 64), "lokr-decomposed", None),
    ("lora_unet_output_blocks_1_1_transformer_blocks_1_ff_net_2", "unet",
     "up_blocks.0.attentions.1.transformer_blocks.1.ff.net.2", (64, 256), "lora", "column"),
    ("lora_unet_input_blocks_1_0_in_layers_2", "unet", "down_blocks.0.resnets.0.conv1", (32, 32, 3, 3), "locon-tucker", None),
    ("lora_unet_input_blocks_1_0_out_layers_3", "unet", "down_blocks.0.resnets.0.conv2", (32, 32, 3, 3), "lokr-tucker", None),
    ("lora_unet_output_blocks_0_0_emb_layers_1", "unet", "up_blocks.0.resnets.0.time_emb_proj", (64, 128), "lokr-full", "row"),
    ("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", "text_encoder",
     "encoder.layers.0.self_attn.k_proj", (32, 32), "lokr-full", None),
    ("lora_te2_text_model_encoder_layers_1_mlp_fc1", "text_encoder_2", "encoder.layers.1.mlp.fc1", (37, 32), "loha", None),
]  # fmt: skip
SDXL_UNET_WEIGHTS = {"down": 0.5, "mid": 1.5, "up": {"block_0": [0.2, 0.4]}}


def diffusers_unet_weights(modules: list[str], spec: dict[str, Any]) -> dict[str, float]:
    """The weight diffusers' set_adapters gives a LoRA layer on each module under a UNet block dict:
    PEFT layers injected on exactly these modules of tiny-sdxl's UNet, scaling / (α/r) read back."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = UNet2DConditionModel.from_pretrained(builtin_base_path("tiny-sdxl") / "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=modules), adapter_name="probe")
    unet.set_adapters(["probe"], weights=[spec])
    return {
        name: float(module.scaling["probe"])
        for name, module in unet.named_modules()
        if isinstance(module, BaseTunerLayer) and name in modules
    }


def test_sdxl_sgm_named_kohya_file_with_unet_block_weights(tmp_path: Path) -> None:
    modules, stems = [], {}
    for i, (stem, component, name, shape, algorithm, dora) in enumerate(SDXL_MODULES):
        module = make_module(component, name, shape, algorithm, seed=300 + 10 * i)
        if dora:
            add_dora(module, dora, seed=305 + 10 * i)
        modules.append(module)
        stems[name] = stem
    tensors = {}
    for module in modules:
        for suffix, tensor in module.tensors.items():
            tensors[f"{stems[module.module]}.{suffix}"] = tensor
    save_file(tensors, str(tmp_path / "xl.safetensors"))
    text = f"""\
        base: builtin:tiny-sdxl
        adapters: {{xl: {{file: xl.safetensors}}}}
        set_adapters:
          adapters: {{xl: {{unet: {json.dumps(SDXL_UNET_WEIGHTS)}, text_encoder: 0.7, text_encoder_2: 0.3}}}}
        fuse: {{lora_scale: 0.9}}
        outputs: {{fused: {{kind: pipeline, path: fused}}}}
        """
    components = ("unet", "text_encoder", "text_encoder_2")
    fused = both_routes(tmp_path, textwrap.dedent(text), components)
    unet_weights = diffusers_unet_weights(
        [m.module for m in modules if m.component == "unet"], SDXL_UNET_WEIGHTS
    )
    assert unet_weights["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == 0.5
    assert unet_weights["down_blocks.0.resnets.0.conv1"] == 1.0  # block 0 has no attention
    assert unet_weights["up_blocks.0.resnets.0.time_emb_proj"] == 0.2  # a resnet takes attention 0's weight
    base = {c: weights_of(builtin_base_path("tiny-sdxl"), c) for c in components}
    weight = {**unet_weights, "text_encoder": 0.7, "text_encoder_2": 0.3}
    expected = {}
    for m in modules:
        strength = weight[m.module if m.component == "unet" else m.component] * 0.9
        # CLIPTextModelWithProjection's file keeps the 'text_model.' its module names no longer have
        key = next(
            k for k in (f"{m.module}.weight", f"text_model.{m.module}.weight") if k in base[m.component]
        )
        expected[(m.component, key)] = expected_weight(base[m.component][key], [(m, strength)])
    assert_fused(base, fused, expected)


# ---------------------------------------------------------------------------------------------
# FLUX.1: BFL names (fused qkv and linear1 narrowed by rows, swapped final-layer halves),
# OneTrainer's flattened diffusers names, CLIP, per-block weights
# ---------------------------------------------------------------------------------------------

_D, _S = "transformer_blocks", "single_transformer_blocks"
FLUX_PARTS = {  # BFL module -> (diffusers parts, their heights), the FLUX.1 layout written out
    "double_blocks.0.img_attn.qkv": (
        [f"{_D}.0.attn.to_q", f"{_D}.0.attn.to_k", f"{_D}.0.attn.to_v"],
        [32] * 3,
    ),
    "single_blocks.1.linear1": (
        [f"{_S}.1.attn.to_q", f"{_S}.1.attn.to_k", f"{_S}.1.attn.to_v", f"{_S}.1.proj_mlp"],
        [32, 32, 32, 128],
    ),
    "double_blocks.1.img_mlp.0": ([f"{_D}.1.ff.net.0.proj"], [128]),
    "final_layer.adaLN_modulation.1": (["norm_out.linear"], [64]),
}
FLUX_BLOCKS = {"double_blocks": {0: 0.5, 1: 1.2}, "single_blocks": 0.8, "default": 0.3}


def _flux_expected(
    base: dict[str, torch.Tensor], bfl: str, module: Module, strength: float
) -> dict[tuple[str, str], torch.Tensor]:
    """A BFL module's fused weights: the parts stacked into the fused weight, the oracle applied to it,
    then split by rows (and FLUX.1's final layer: BFL shift|scale rows are diffusers' scale|shift)."""
    parts, heights = FLUX_PARTS[bfl]
    stacked = torch.cat([base[f"{p}.weight"] for p in parts])
    if bfl.startswith("final_layer"):
        stacked = torch.cat(stacked.chunk(2)[::-1])
    fused = expected_weight(stacked, [(module, strength)])
    if bfl.startswith("final_layer"):
        fused = torch.cat(fused.chunk(2)[::-1])
    return {("transformer", f"{p}.weight"): t for p, t in zip(parts, fused.split(heights), strict=True)}


def test_flux_bfl_names_fused_qkv_linear1_final_layer_and_blocks(tmp_path: Path) -> None:
    bfl = {
        "double_blocks.0.img_attn.qkv": make_module(
            "transformer", "qkv", (96, 32), "lokr-decomposed", seed=400
        ),
        "single_blocks.1.linear1": make_module("transformer", "linear1", (224, 32), "loha", seed=410),
        "double_blocks.1.img_mlp.0": make_module("transformer", "mlp", (128, 32), "lora", seed=420),
        "final_layer.adaLN_modulation.1": make_module(
            "transformer", "final", (64, 32), "lokr-full", seed=430
        ),
    }
    add_dora(bfl["double_blocks.0.img_attn.qkv"], "row", seed=405)  # rows narrow like ΔW's
    tensors = {}
    for name, module in bfl.items():
        for suffix, tensor in module.tensors.items():
            tensors[f"lora_unet_{name.replace('.', '_')}.{suffix}"] = tensor
    onetrainer = make_module("transformer", f"{_D}.1.attn.to_k", (32, 32), "loha", seed=440)
    add_dora(onetrainer, "column", seed=445)
    clip = make_module("text_encoder", "encoder.layers.0.self_attn.q_proj", (32, 32), "lokr-full", seed=450)
    for suffix, tensor in onetrainer.tensors.items():
        tensors[f"lora_transformer_{_D}_1_attn_to_k.{suffix}"] = tensor
    for suffix, tensor in clip.tensors.items():
        tensors[f"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.{suffix}"] = tensor
    save_file(tensors, str(tmp_path / "flux.safetensors"))
    aitk = make_module("transformer", "proj", (32, 32), "lokr-decomposed", seed=460)  # ai-toolkit's LDM names
    save_file(
        {f"diffusion_model.double_blocks.1.txt_attn.proj.{k}": v for k, v in aitk.tensors.items()},
        str(tmp_path / "aitk.safetensors"),
    )
    text = f"""\
        base: builtin:tiny-flux
        adapters: {{f: {{file: flux.safetensors}}, a: {{file: aitk.safetensors}}}}
        set_adapters:
          adapters:
            f: {{transformer: {json.dumps(FLUX_BLOCKS)}, text_encoder: 0.6}}
            a: -0.7
        fuse: {{lora_scale: 0.9}}
        outputs: {{fused: {{kind: pipeline, path: fused}}}}
        """
    fused = both_routes(tmp_path, textwrap.dedent(text), ("transformer", "text_encoder"))
    flux = builtin_base_path("tiny-flux")
    base = {c: weights_of(flux, c) for c in ("transformer", "text_encoder")}
    block = {"double_blocks.0": 0.5, "double_blocks.1": 1.2, "single_blocks": 0.8, "final_layer": 0.3}
    expected: dict[tuple[str, str], torch.Tensor] = {}
    for name, module in bfl.items():
        weight = next(w for prefix, w in block.items() if name.startswith(prefix))
        expected.update(_flux_expected(base["transformer"], name, module, weight * 0.9))
    key = f"{_D}.1.attn.to_k.weight"
    expected[("transformer", key)] = expected_weight(base["transformer"][key], [(onetrainer, 1.2 * 0.9)])
    key = f"{_D}.1.attn.to_add_out.weight"
    expected[("transformer", key)] = expected_weight(base["transformer"][key], [(aitk, -0.7 * 0.9)])
    key = "encoder.layers.0.self_attn.q_proj.weight"
    expected[("text_encoder", key)] = expected_weight(base["text_encoder"][key], [(clip, 0.6 * 0.9)])
    assert len(expected) == 12
    assert_fused(base, fused, expected)


def test_flux_dora_per_column_on_a_fused_module_is_refused(tmp_path: Path) -> None:
    """A column norm of the fused qkv spans to_q, to_k and to_v, three weights here: refused, not split."""
    module = make_module("transformer", "qkv", (96, 32), "lora", seed=1)
    add_dora(module, "column", seed=2)
    save_file(
        {f"lora_unet_double_blocks_0_img_attn_qkv.{k}": v for k, v in module.tensors.items()},
        str(tmp_path / "d.safetensors"),
    )
    text = """\
        base: builtin:tiny-flux
        adapters: {d: {file: d.safetensors}}
        fuse: {adapters: [d]}
        outputs: {fused: {kind: pipeline, path: fused}}
        """
    found = messages(problems_of(tmp_path, text))
    assert (
        len(found) == 1
        and "lora_unet_double_blocks_0_img_attn_qkv: DoRA normalizes each input column" in found[0]
    )


# ---------------------------------------------------------------------------------------------
# diffusers' UNet block weights, resolved without diffusers
# ---------------------------------------------------------------------------------------------

UNET_SPECS = [
    {"down": 0.5},
    {"mid": 1.5, "up": 0.25},
    {"down": {"block_1": [0.3]}, "up": {"block_0": [0.2, 0.4]}, "mid": [0.9]},
    {"up": {"block_0": 0.7}},
]


@pytest.mark.parametrize("spec", UNET_SPECS, ids=lambda s: json.dumps(s))
def test_unet_block_weights_equal_diffusers_set_adapters_on_every_module(spec: dict[str, Any]) -> None:
    """Every Linear/Conv2d module of tiny-sdxl's UNet that diffusers' block expansion reaches (all but
    the few outside the down/mid/up blocks, where diffusers fails): lorarecipe's weight == the one
    diffusers' set_adapters gives a LoRA layer there."""
    from diffusers import UNet2DConditionModel

    from lorarecipe.families.unet_blocks import expand_unet_weights, unet_module_weight

    unet = UNet2DConditionModel.from_pretrained(builtin_base_path("tiny-sdxl") / "unet")
    modules = [
        name
        for name, module in unet.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and len(name.split(".")) >= 4
    ]
    theirs = diffusers_unet_weights(modules, spec)
    expanded = expand_unet_weights(spec, unet.state_dict().keys())
    ours = {name: unet_module_weight(expanded, name) for name in modules}
    assert len(modules) > 100 and ours == theirs


# ---------------------------------------------------------------------------------------------
# Grids: LyCORIS columns apply the deltas in place and restore the base from copies
# ---------------------------------------------------------------------------------------------


def test_grid_columns_of_a_lycoris_adapter_equal_the_fused_model_and_restore_the_base(tmp_path: Path) -> None:
    """With a LoRA loaded too (disabled for these cells), the 'lyco' column (weight 1) and the sweep cell
    at 0.5 render exactly what the base column of a model fused with that weight renders; the base
    column, rendered after them, is the base's own."""
    from PIL import Image

    modules = sd_modules("kohya")
    save_file(state_dict(modules, "kohya"), str(tmp_path / "lyco.safetensors"))
    grid = "prompts: [a cat], seeds: [0], steps: 2, size: 32"
    text = f"""\
        base: builtin:tiny-sd
        adapters: {{lyco: {{file: lyco.safetensors}}, style: builtin:tiny-sd/style}}
        set_adapters: {{adapters: {{lyco: 0.5}}}}
        fuse: {{lora_scale: 1.0}}
        outputs:
          grid: {{kind: grid, path: g.png, {grid}, variants: [lyco, base, style, mix, fused], sweep: {{adapter: lyco, weights: [0.5]}}}}
        """
    build_text(tmp_path, textwrap.dedent(text), out="a")
    assert json.loads((tmp_path / "a" / "g.json").read_text())["fused_vs_runtime_max_abs_diff"] == 0.0

    def pixels(root: Path, variant: str) -> bytes:
        """A cell's pixels (the PNGs' text chunks name their recipe, so the files differ)."""
        doc = json.loads((root / "g.json").read_text())
        cell = next(c for c in doc["cells"] if c["variant"] == variant)
        with Image.open(root / cell["file"]) as image:
            return image.tobytes()

    for scale, variant in ((1.0, "lyco"), (0.5, "sweep")):
        fuse = f"""\
            base: builtin:tiny-sd
            adapters: {{lyco: {{file: lyco.safetensors}}}}
            fuse: {{adapters: [lyco], lora_scale: {scale}}}
            outputs: {{fused: {{kind: pipeline, path: fused}}}}
            """
        build_text(tmp_path, textwrap.dedent(fuse), out=f"f{scale}", name=f"f{scale}.yaml")
        show = f"""\
            base: {{path: f{scale}/fused}}
            adapters: {{style: builtin:tiny-sd/style}}
            outputs: {{grid: {{kind: grid, path: g.png, {grid}, variants: [base]}}}}
            """
        build_text(tmp_path, textwrap.dedent(show), out=f"g{scale}", name=f"g{scale}.yaml")
        assert pixels(tmp_path / "a", variant) == pixels(tmp_path / f"g{scale}", "base"), variant
    assert pixels(tmp_path / "a", "mix") == pixels(tmp_path / "a", "sweep")
    plain = f"""\
        base: builtin:tiny-sd
        adapters: {{style: builtin:tiny-sd/style}}
        outputs: {{grid: {{kind: grid, path: g.png, {grid}, variants: [base, style]}}}}
        """
    build_text(tmp_path, textwrap.dedent(plain), out="p", name="p.yaml")
    assert pixels(tmp_path / "a", "base") == pixels(tmp_path / "p", "base")
    assert pixels(tmp_path / "a", "style") == pixels(tmp_path / "p", "style")


@pytest.mark.parametrize("convention", [None, "lycoris", "peft"])
def test_scale_convention_of_a_full_matrix_lokr(tmp_path: Path, convention: str | None) -> None:
    """A PEFT-layout LoKr of full factors (α 3, r 2 in its metadata): PEFT's meaning, α/r = 1.5, by
    default; 'lycoris' makes it 1 (what kohya/LyCORIS files mean); 'peft' states the default."""
    module = make_module("unet", _A + "attn1.to_k", (32, 32), "lokr-full", seed=7)
    save_file(
        state_dict([module], "diffusers"),
        str(tmp_path / "k.safetensors"),
        metadata=adapter_metadata(("unet",), 2, 3.0),
    )
    option = f", scale_convention: {convention}" if convention else ""
    text = f"""\
        base: builtin:tiny-sd
        adapters: {{k: {{file: k.safetensors{option}}}}}
        fuse: {{adapters: [k]}}
        outputs: {{fused: {{kind: pipeline, path: fused}}}}
        """
    fused = both_routes(tmp_path, textwrap.dedent(text), ("unet",))
    base = {"unet": weights_of(builtin_base_path("tiny-sd"), "unet")}
    key = f"{_A}attn1.to_k.weight"
    scale = 1.0 if convention == "lycoris" else 1.5
    assert_fused(base, fused, {("unet", key): base["unet"][key].double() + scale * module.delta})  # type: ignore[operator]


def test_single_file_output_and_single_file_base(tmp_path: Path) -> None:
    """The LDM single-file layout both ways: a LyCORIS fuse written as a single file (placed on the
    diffusers architecture), and a single-file base fused again; streamed == pipeline route, bit for bit."""
    import shutil

    from safetensors.torch import load_file

    save_file(state_dict(sd_modules("kohya"), "kohya"), str(tmp_path / "lyco.safetensors"))
    text = """\
        base: builtin:tiny-sd
        adapters: {lyco: {file: lyco.safetensors}}
        fuse: {adapters: [lyco], lora_scale: 0.5}
        outputs:
          fused: {kind: pipeline, path: fused}
          single: {kind: single_file, path: single.safetensors}
        """
    both_routes(tmp_path, textwrap.dedent(text), SD_COMPONENTS)
    one, two = (
        load_file(str(tmp_path / "pipe" / "single.safetensors")),
        load_file(str(tmp_path / "stream" / "single.safetensors")),
    )
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    shutil.copytree(builtin_base_path("tiny-sd"), tmp_path / "config")
    shutil.copy(tmp_path / "pipe" / "single.safetensors", tmp_path / "base.safetensors")
    again = """\
        base: {file: base.safetensors, config: config}
        adapters: {lyco: {file: lyco.safetensors}}
        fuse: {adapters: [lyco], lora_scale: -0.5}
        outputs: {fused: {kind: pipeline, path: fused}}
        """
    folder = tmp_path / "again"
    folder.mkdir()
    for name in ("lyco.safetensors", "base.safetensors"):
        shutil.copy(tmp_path / name, folder / name)
    shutil.copytree(tmp_path / "config", folder / "config")
    fused = both_routes(folder, textwrap.dedent(again), SD_COMPONENTS)
    base = {c: weights_of(builtin_base_path("tiny-sd"), c) for c in SD_COMPONENTS}
    for module in sd_modules("kohya"):
        if module.dora is None:  # ±0.5 of an additive ΔW cancels up to float32 rounding
            key = f"{module.module}.weight"
            assert float((fused[module.component][key] - base[module.component][key]).abs().max()) < 1e-5


def test_half_precision_base_rounds_once_on_both_routes(tmp_path: Path) -> None:
    """A float16 base: both routes fuse each weight in float32 and round it once (a LyCORIS/DoRA term
    is applied to the whole float32 weight), so they agree bit for bit, within half an ulp of exact."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(builtin_base_path("tiny-sd"), tmp_path / "half")
    for file in (tmp_path / "half").glob("*/*.safetensors"):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(file)).items()}
        save_file(tensors, str(file), metadata={"format": "pt"})
    modules = sd_modules("kohya")
    save_file(state_dict(modules, "kohya"), str(tmp_path / "lyco.safetensors"))
    text = """\
        base: {path: half}
        adapters: {lyco: {file: lyco.safetensors}}
        fuse: {adapters: [lyco], lora_scale: 0.8}
        outputs: {fused: {kind: pipeline, path: fused}}
        """
    fused = both_routes(tmp_path, textwrap.dedent(text), SD_COMPONENTS)
    base = {c: weights_of(tmp_path / "half", c) for c in SD_COMPONENTS}
    for module in modules:
        key = f"{module.module}.weight"
        got = fused[module.component][key]
        expected = expected_weight(base[module.component][key].float(), [(module, 0.8)])
        assert got.dtype == torch.float16
        ulp = torch.finfo(torch.float16).eps * expected.abs().clamp(min=2**-14)
        assert bool(((got.double() - expected).abs() <= 0.5 * ulp + 1e-6).all()), key


def test_a_warm_pipeline_after_lycoris_fuses_grids_and_extraction_builds_like_a_fresh_one(
    tmp_path: Path,
) -> None:
    """A warm batch: a build that applies a LyCORIS/DoRA adapter in place (fuse, grid cells) and extracts
    it, then a build of plain LoRAs on the same (reused) pipeline; each equals its build alone."""
    from safetensors.torch import load_file

    from lorarecipe.gitops.batch import BatchOptions, build_recipes
    from lorarecipe.recipe.load import find_recipe_files

    folder = tmp_path / "recipes"
    folder.mkdir()
    save_file(state_dict(sd_modules("kohya"), "kohya"), str(folder / "lyco.safetensors"))
    grid = "{kind: grid, path: g.png, prompts: [a cat], seeds: [0], steps: 2, size: 32, variants: [base, lyco, mix, fused]}"
    (folder / "a.yaml").write_text(
        textwrap.dedent(
            f"""\
            name: a
            base: builtin:tiny-sd
            adapters: {{lyco: {{file: lyco.safetensors}}, style: builtin:tiny-sd/style}}
            merges: {{x: {{method: extract, adapters: [lyco, style], svd_rank: 4}}}}
            set_adapters: {{adapters: {{lyco: 0.5, style: 0.7}}}}
            fuse: {{lora_scale: 1.0}}
            outputs:
              fused: {{kind: pipeline, path: fused}}
              lora: {{kind: lora, adapter: x, path: lora}}
              grid: {grid}
            """
        )
    )
    (folder / "b.yaml").write_text(
        textwrap.dedent(
            """\
            name: b
            base: builtin:tiny-sd
            adapters: {style: builtin:tiny-sd/style}
            fuse: {adapters: [style], lora_scale: 0.3}
            outputs:
              fused: {kind: pipeline, path: fused}
              grid: {kind: grid, path: g.png, prompts: [a cat], seeds: [0], steps: 2, size: 32, variants: [base, fused]}
            """
        )
    )
    from tests.helpers.batch_builds import forget_rendered_cells

    forget_rendered_cells()
    options = BatchOptions(out=tmp_path / "warm", executor="diffusers")
    outcomes = build_recipes(find_recipe_files([str(folder)]), options, several=True)
    assert [o.ok for o in outcomes] == [True, True], [o.problems for o in outcomes]
    assert [o.worker["pipeline"]["loaded"] for o in outcomes if o.worker] == [1, 0]
    for name in ("a", "b"):
        forget_rendered_cells()
        text = (folder / f"{name}.yaml").read_text()
        build_text(folder, text, out=f"cold-{name}", name=f"{name}-cold.yaml", executor="diffusers")
        warm, cold = tmp_path / "warm" / name, folder / f"cold-{name}"
        files = sorted(p.relative_to(cold) for p in cold.rglob("*.safetensors"))
        assert files
        for rel in files:
            x, y = load_file(str(cold / rel)), load_file(str(warm / rel))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), rel
        cells = sorted(p.relative_to(cold) for p in (cold / "g_cells").glob("*.png"))
        from PIL import Image

        for rel in cells:
            with Image.open(cold / rel) as one, Image.open(warm / rel) as two:
                assert one.tobytes() == two.tobytes(), rel
