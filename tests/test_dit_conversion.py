"""FLUX.2 and Wan original layouts against diffusers' own converters, and header-only checks, at full size.

No real FLUX.2 or Wan LoRA key list exists in ``../shared/realdata`` (its manifests cover FLUX.1,
Qwen-Image, Anima and Krea2), so the full-size key lists here are the released models' module lists
(FLUX.2 dev, Klein 4B/9B, Wan 1.3B/14B/TI2V-5B configs, built weightless on the meta device) written
in each trainer's naming. Checked:

- single file: every diffusers key has exactly one place in the original layout, and diffusers'
  ``convert_flux2_transformer_checkpoint_to_diffusers`` / ``convert_wan_transformer_to_diffusers`` read
  it back to the same keys and values (tiny random models, I2V included; full-size shapes on meta);
- LoRA conversion bit-identical to diffusers' converters wherever those are right: FLUX.2 kohya/musubi
  (fused qkv, dense and block-diagonal ``up``) and ai-toolkit, Wan ComfyUI (with and without alpha)
  and musubi, float32 and bfloat16, at full size. Where diffusers is wrong the difference is asserted:
  FLUX.2 kohya modules it drops with a log line, the ai-toolkit final adaLN it leaves unswapped while
  its own single-file reader swaps it, musubi Wan files with embedders it cannot read;
- header-only detection: family and model of every layout at full size, and a LoRA for a sibling
  refused naming both (FLUX.1 on FLUX.2, Klein 4B on Klein 9B, Wan 1.3B on a Wan 2.2 A14B expert).
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import Flux2Transformer2DModel, WanTransformer3DModel
from diffusers.loaders import lora_conversion_utils as dconv
from diffusers.loaders.single_file_utils import (
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_wan_transformer_to_diffusers,
)

from lorarecipe.families import FAMILIES, Family
from lorarecipe.inspect import (
    BaseInfo,
    ComponentInfo,
    SafetensorsHeader,
    TensorInfo,
    check_lora_against_base,
    inspect_lora,
)
from lorarecipe.outputs.singlefile import to_single_file_state_dict
from lorarecipe.outputs.singlefile_names import map_rule_keys
from lorarecipe.runner.lora_conversion import convert_original_lora

FLUX2, WAN = FAMILIES["flux2"], FAMILIES["wan"]

# the released transformers' configs (black-forest-labs/FLUX.2-dev, FLUX.2-klein-4B/9B; Wan-AI/Wan2.1-T2V-1.3B,
# Wan2.1-T2V-14B / each Wan2.2-T2V-A14B expert, Wan2.2-TI2V-5B, Wan2.1-I2V-14B)
CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "flux2-dev": (Flux2Transformer2DModel, {}),
    "klein-4b": (
        Flux2Transformer2DModel,
        {
            "num_layers": 5,
            "num_single_layers": 20,
            "num_attention_heads": 24,
            "joint_attention_dim": 7680,
            "guidance_embeds": False,
        },
    ),
    "klein-9b": (
        Flux2Transformer2DModel,
        {
            "num_layers": 8,
            "num_single_layers": 24,
            "num_attention_heads": 32,
            "joint_attention_dim": 12288,
            "guidance_embeds": False,
        },
    ),
    "wan-1.3b": (WanTransformer3DModel, {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}),
    "wan-14b": (WanTransformer3DModel, {}),
    "wan-5b": (
        WanTransformer3DModel,
        {
            "num_attention_heads": 24,
            "ffn_dim": 14336,
            "num_layers": 30,
            "in_channels": 48,
            "out_channels": 48,
        },
    ),
    "wan-i2v-14b": (
        WanTransformer3DModel,
        {"in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},
    ),
}


def _shapes(name: str) -> dict[str, tuple[int, ...]]:
    cls, config = CONFIGS[name]
    with init_empty_weights():
        model = cls(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _family(name: str) -> Family:
    return FLUX2 if CONFIGS[name][0] is Flux2Transformer2DModel else WAN


# ---- single file ------------------------------------------------------------------------------------


def _tiny(cls: type, **config: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return cls(**config).state_dict()  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_full_size_key_has_one_original_place(name: str) -> None:
    shapes = _shapes(name)
    mapped = map_rule_keys(_family(name), shapes)
    assert not [k for k, t in mapped.items() if t is None]
    targets = [(t.key, t.part) for t in mapped.values() if t is not None]
    assert len(targets) == len(set(targets))  # no two diffusers tensors in one place


@pytest.mark.parametrize(
    ("family", "state", "read"),
    [
        (
            "flux2",
            lambda: _tiny(
                Flux2Transformer2DModel,
                in_channels=16,
                num_layers=2,
                num_single_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=24,
                timestep_guidance_channels=32,
                axes_dims_rope=(4, 4, 4, 4),
            ),
            convert_flux2_transformer_checkpoint_to_diffusers,
        ),
        (
            "wan",
            lambda: _tiny(
                WanTransformer3DModel,
                num_attention_heads=2,
                attention_head_dim=12,
                text_dim=32,
                freq_dim=16,
                ffn_dim=32,
                num_layers=2,
                rope_max_seq_len=32,
                image_dim=8,
                added_kv_proj_dim=24,
                in_channels=36,
            ),
            convert_wan_transformer_to_diffusers,
        ),
    ],
)
def test_single_file_names_invert_diffusers_reader(family: str, state: Any, read: Any) -> None:
    """Written in the original names (fused qkv, swapped final adaLN, Wan's norm3 and modulation),
    diffusers' own reader gives back every key and value (I2V's image embedder included)."""
    diffusers = state()
    original = to_single_file_state_dict(family, {"transformer": diffusers}, {"transformer": {}})
    back = read(dict(original))
    assert back.keys() == diffusers.keys()
    assert all(torch.equal(back[k], diffusers[k]) for k in diffusers)


def test_wan_keeps_the_modules_diffusers_keeps_in_float32() -> None:
    assert set(WAN.keep_in_float32) == set(WanTransformer3DModel._keep_in_fp32_modules)
    assert not getattr(Flux2Transformer2DModel, "_keep_in_fp32_modules", None) and not FLUX2.keep_in_float32


# ---- LoRA files at full size ----------------------------------------------------------------------------


def _lora(
    name: str,
    layout: str,
    rank: int,
    select: Any,
    dtype: torch.dtype,
    block_diagonal: bool = False,
    alpha: float | None = 8.0,
) -> dict[str, torch.Tensor]:
    """A full-size LoRA state dict in ``layout`` over the original modules of ``name`` that ``select``
    keeps (seeded random values; fused ``up`` weights optionally block-diagonal)."""
    shapes, family = _shapes(name), _family(name)
    generator = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for rule in family.original_modules:
        for index in range(100) if "{i}" in rule.original else (None,):
            parts = [d.replace("{i}", str(index)) + ".weight" for d in rule.diffusers]
            if not all(p in shapes and len(shapes[p]) == 2 for p in parts):
                break
            original = rule.original.replace("{i}", str(index))
            if not select(original):
                continue
            heights = [shapes[p][0] for p in parts]
            down = torch.randn(rank, shapes[parts[0]][1], generator=generator)
            up = torch.randn(sum(heights), rank, generator=generator)
            if block_diagonal and len(parts) > 1:
                mask, row = torch.zeros_like(up), 0
                for j, height in enumerate(heights):
                    mask[row : row + height, j * rank // len(parts) : (j + 1) * rank // len(parts)] = 1
                    row += height
                up = up * mask
            if layout == "kohya":
                stem, roles = "lora_unet_" + original.replace(".", "_"), ("lora_down", "lora_up")
            else:
                stem = "diffusion_model." + original
                roles = ("lora_A", "lora_B") if layout == "aitk" else ("lora_down", "lora_up")
            out[f"{stem}.{roles[0]}.weight"] = down.to(dtype)
            out[f"{stem}.{roles[1]}.weight"] = up.to(dtype)
            if alpha is not None and layout != "aitk":
                out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def _same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))[:6]
    differ = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not differ, differ[:5]


def _blocks(name: str) -> bool:
    return name.startswith(("double_blocks.", "single_blocks."))


@pytest.mark.parametrize(("dtype", "block_diagonal"), [(torch.float32, False), (torch.bfloat16, True)])
def test_flux2_kohya_matches_diffusers_where_it_converts(dtype: torch.dtype, block_diagonal: bool) -> None:
    """Klein 4B, every block module (fused qkv, linear1/linear2): diffusers' factors, bit for bit."""
    state = _lora("klein-4b", "kohya", 6, _blocks, dtype, block_diagonal)
    ours = convert_original_lora(FLUX2, state, {}, "klein")
    _same(ours, dconv._convert_kohya_flux2_lora_to_diffusers(dict(state)))


def test_flux2_kohya_modules_diffusers_drops_are_placed() -> None:
    """diffusers' kohya converter logs and drops the shared modulation, the guidance embedder and the
    final adaLN; lorarecipe places them (the final adaLN with its halves swapped, as the single-file
    reader stores it)."""
    state = _lora("flux2-dev", "kohya", 2, lambda name: not _blocks(name), torch.float32)
    theirs = dconv._convert_kohya_flux2_lora_to_diffusers(dict(state))
    ours = convert_original_lora(FLUX2, state, {}, "dev")
    dropped = sorted({k.rsplit(".lora_", 1)[0] for k in set(ours) - set(theirs)})
    assert dropped == [
        "transformer.double_stream_modulation_img.linear",
        "transformer.double_stream_modulation_txt.linear",
        "transformer.norm_out.linear",
        "transformer.single_stream_modulation.linear",
        "transformer.time_guidance_embed.guidance_embedder.linear_1",
        "transformer.time_guidance_embed.guidance_embedder.linear_2",
    ]
    _same({k: v for k, v in ours.items() if k in theirs}, theirs)


def test_flux2_ai_toolkit_matches_diffusers_but_for_the_final_adaln() -> None:
    """ai-toolkit (no alpha): diffusers' factors bit for bit, except ``final_layer.adaLN_modulation.1``,
    which diffusers' LoRA converter maps onto ``norm_out.linear`` unswapped although its own single-file
    reader swaps that weight's halves (shift|scale -> scale|shift): the LoRA would modulate with
    its shift and scale exchanged. lorarecipe swaps it."""
    state = _lora("klein-9b", "aitk", 4, lambda name: True, torch.float32)
    theirs = dconv._convert_non_diffusers_flux2_lora_to_diffusers(dict(state))
    ours = convert_original_lora(FLUX2, state, {}, "klein")
    key = "transformer.norm_out.linear.lora_B.weight"
    shift, scale = theirs[key].chunk(2)
    assert torch.equal(ours[key], torch.cat([scale, shift])) and not torch.equal(ours[key], theirs[key])
    _same({k: v for k, v in ours.items() if k != key}, {k: v for k, v in theirs.items() if k != key})


@pytest.mark.parametrize(
    ("layout", "alpha", "modules"),
    [("comfy", 8.0, "blocks."), ("comfy", None, ""), ("aitk", None, "")],
)
def test_wan_comfyui_layouts_match_diffusers(layout: str, alpha: float | None, modules: str) -> None:
    """Wan 14B I2V (image cross-attention, embedders, head): ``diffusion_model.`` files, bit for bit."""
    state = _lora(
        "wan-i2v-14b", layout, 4, lambda name: name.startswith(modules), torch.bfloat16, alpha=alpha
    )
    ours = convert_original_lora(WAN, state, {}, "wan")
    theirs = dconv._convert_non_diffusers_wan_lora_to_diffusers({k: v.clone() for k, v in state.items()})
    _same(ours, theirs)


def test_wan_comfyui_alphas_outside_blocks_diffusers_cannot_read() -> None:
    """diffusers applies alphas inside blocks only and refuses the rest of such a file; lorarecipe
    scales every module by its alpha."""
    state = _lora("wan-1.3b", "comfy", 4, lambda name: True, torch.float32, alpha=2.0)
    with pytest.raises(ValueError, match="should be empty"):
        dconv._convert_non_diffusers_wan_lora_to_diffusers(dict(state))
    ours = convert_original_lora(WAN, state, {}, "wan")
    down = state["diffusion_model.time_projection.1.lora_down.weight"]
    assert torch.equal(ours["transformer.condition_embedder.time_proj.lora_A.weight"], down * 0.5)


def test_wan_musubi_matches_diffusers_and_reads_what_it_cannot() -> None:
    state = _lora("wan-14b", "kohya", 4, lambda name: name.startswith("blocks."), torch.float32)
    _same(
        convert_original_lora(WAN, state, {}, "wan"), dconv._convert_musubi_wan_lora_to_diffusers(dict(state))
    )
    every = _lora("wan-1.3b", "kohya", 4, lambda name: True, torch.float32)  # + embedders and head
    with pytest.raises(IndexError):
        dconv._convert_musubi_wan_lora_to_diffusers(dict(every))
    converted = convert_original_lora(WAN, every, {}, "wan")
    assert "transformer.condition_embedder.time_proj.lora_A.weight" in converted
    assert len(converted) == 2 * sum(1 for k in every if k.endswith(".lora_down.weight"))


# ---- header-only detection and siblings -------------------------------------------------------------------


def _header(state: dict[str, torch.Tensor]) -> SafetensorsHeader:
    tensors, offset = {}, 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        tensors[key] = TensorInfo(key, "F32", tuple(tensor.shape), offset, offset + size)
        offset += size
    return SafetensorsHeader(
        "lora.safetensors", offset + 8, 0, MappingProxyType(tensors), MappingProxyType({})
    )


def _base(name: str, family: str, experts: tuple[str, ...] = ("transformer",)) -> BaseInfo:
    table = {k: ("BF16", s) for k, s in _shapes(name).items()}
    components = {e: ComponentInfo(e, None, (), MappingProxyType(table)) for e in experts}
    return BaseInfo(
        "diffusers_folder", family, f"config of {name}", None, "bfloat16", MappingProxyType(components), 0, 0
    )


def _diffusers_lora(name: str, select: Any) -> dict[str, torch.Tensor]:
    """A PEFT-layout LoRA (``transformer.`` + diffusers names) over ``name``'s Linear weights, rank 1."""
    out = {}
    for key, shape in _shapes(name).items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and len(shape) == 2 and select(module):
            out[f"transformer.{module}.lora_A.weight"] = torch.empty(1, shape[1], device="meta")
            out[f"transformer.{module}.lora_B.weight"] = torch.empty(shape[0], 1, device="meta")
    return out


@pytest.mark.parametrize(
    ("name", "layout", "family", "model"),
    [
        ("flux2-dev", "kohya", "flux2", "FLUX.2 dev"),
        ("klein-4b", "aitk", "flux2", "FLUX.2 Klein 4B"),
        ("klein-9b", "kohya", "flux2", "FLUX.2 Klein 9B"),
        ("wan-1.3b", "comfy", "wan", "Wan 2.1 1.3B"),
        ("wan-14b", "kohya", "wan", "Wan 14B (2.1 T2V/I2V-14B, or one 2.2 A14B expert)"),
        ("wan-5b", "aitk", "wan", "Wan 2.2 TI2V-5B"),
    ],
)
def test_full_size_layouts_are_recognized_and_fit(name: str, layout: str, family: str, model: str) -> None:
    from lorarecipe.inspect.lora_family import lora_variant

    state = _lora(name, layout, 1, lambda n: True, torch.float32)
    info = inspect_lora(_header({k: v.to("meta") for k, v in state.items()}))
    assert (info.family, info.unsupported, info.unrecognized_keys) == (family, None, ())
    variant = lora_variant(FAMILIES[family], info.modules)
    assert variant is not None and variant.label == model
    report = check_lora_against_base(info, _base(name, family))
    assert (report.matched, report.total, report.family_conflict) == (
        len(info.modules),
        len(info.modules),
        None,
    )


def test_flux1_lora_on_flux2_is_refused_naming_both() -> None:
    flux1 = {
        "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": torch.empty(4, 3072),
        "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": torch.empty(12288, 4),
    }
    report = check_lora_against_base(inspect_lora(_header(flux1)), _base("klein-4b", "flux2"))
    assert report.family_conflict is not None
    assert report.family_conflict.startswith(
        "the LoRA is a FLUX.1 LoRA ('double_blocks_0_img_mlp_0' 3072→12288"
    )
    assert "but the base is FLUX.2" in report.family_conflict


@pytest.mark.parametrize(
    ("lora", "base", "experts", "message"),
    [
        (
            "klein-4b",
            "klein-9b",
            ("transformer",),
            "the LoRA is a FLUX.2 Klein 4B LoRA (hidden width 3072) but the base is FLUX.2 Klein 9B (hidden width 4096)",
        ),
        (
            "wan-1.3b",
            "wan-14b",
            ("transformer", "transformer_2"),
            "the LoRA is a Wan 2.1 1.3B LoRA (hidden width 1536) but the base is Wan 14B (2.1 T2V/I2V-14B, or one "
            "2.2 A14B expert) (hidden width 5120)",
        ),
    ],
)
def test_a_lora_for_a_sibling_model_is_refused_naming_both(
    lora: str, base: str, experts: tuple[str, ...], message: str
) -> None:
    family = _family(lora).key
    info = inspect_lora(_header(_diffusers_lora(lora, lambda m: re.search(r"attn", m) is not None)))
    assert info.family == family
    assert check_lora_against_base(info, _base(base, family, experts)).family_conflict == message


def test_attention_only_width_3072_is_undecided_between_flux1_and_klein_4b() -> None:
    """FLUX.1 and FLUX.2 Klein 4B share these names and shapes: no family is claimed (no false refusal
    of a Klein LoRA), and a FLUX.1-only module or a block Klein lacks decides it."""
    qkv = {
        "lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight": torch.empty(4, 3072),
        "lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight": torch.empty(9216, 4),
    }
    assert inspect_lora(_header(qkv)).family is None
    later = {k.replace("blocks_3", "blocks_12"): v for k, v in qkv.items()}
    assert inspect_lora(_header(later)).family == "flux"
    modulation = {
        **qkv,
        "lora_unet_double_blocks_3_img_mod_lin.lora_down.weight": torch.empty(4, 3072),
        "lora_unet_double_blocks_3_img_mod_lin.lora_up.weight": torch.empty(18432, 4),
    }
    assert inspect_lora(_header(modulation)).family == "flux"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {
                "diffusion_model.blocks.0.self_attn.q.diff_b": torch.empty(24),
                "diffusion_model.blocks.0.norm3.diff": torch.empty(24),
            },
            "2 tensors of the file belong to no LoRA module and would be dropped: "
            "diffusion_model.blocks.0.norm3.diff, diffusion_model.blocks.0.self_attn.q.diff_b",
        ),
    ],
)
def test_wan_bias_diffs_are_refused_naming_the_keys(
    tmp_path: Any, extra: dict[str, torch.Tensor], message: str
) -> None:
    """lightx2v-style ``diff``/``diff_b`` keys (diffusers drops the norm ones silently) are compile errors
    naming the keys. (A Wan DoRA magnitude, which diffusers drops, is applied by lorarecipe:
    tests/test_dit_lycoris.py.)"""
    from safetensors.torch import save_file

    from tests.helpers.recipes import messages, problems_of

    tensors = {
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 24),
        "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(24, 4),
        **{k: torch.zeros_like(v) for k, v in extra.items()},
    }
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    text = (
        "base: builtin:tiny-wan\nadapters: {a: {file: lora.safetensors}}\nfuse: {adapters: [a]}\n"
        "outputs: {f: {kind: pipeline, path: f}}\n"
    )
    found = messages(problems_of(tmp_path, text))
    assert any(message in m for m in found), found
