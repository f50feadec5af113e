"""FLUX.1's original (BFL) layout against diffusers' own converters, at full size.

- LoRA files with the key lists of real FLUX.1 LoRAs (InvokeAI's transcriptions in
  ``../shared/realdata/loras/manifests``; random values): lorarecipe's conversion gives factors
  bit-identical to diffusers' ``FluxLoraLoaderMixin.lora_state_dict`` — kohya with and without the
  CLIP encoder, with dense and block-diagonal fused ``up`` weights, in float32 and bfloat16; XLabs.
  Where diffusers' converter drops something (``final_layer`` alphas, ``final_layer`` keys it
  leaves without the ``transformer.`` prefix) the difference is asserted, not hidden.
- single file: a full-size FLUX.1-dev transformer on the meta device (shapes only): every diffusers
  key has exactly one place in the BFL layout, and diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``
  reads the BFL names back to the same keys and shapes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from lorarecipe.families import FAMILIES
from lorarecipe.outputs.singlefile import single_file_layout
from lorarecipe.runner.lora_conversion import convert_original_lora, is_original_layout

FLUX = FAMILIES["flux"]
MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "loras" / "manifests"
CLIP_L = [
    f"encoder.layers.{i}.{p}"
    for i in range(12)
    for p in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    )
]


def _state_dict(name: str, dtype: torch.dtype, alpha: float, block_diagonal: bool) -> dict[str, torch.Tensor]:
    """A manifest's keys and shapes with seeded random values; fused ``up`` weights optionally zero
    off their diagonal rank blocks (what a LoRA trained on separate q/k/v and fused looks like)."""
    path = MANIFESTS / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    generator = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for key, entry in json.loads(path.read_text())["tensors"].items():
        if key.endswith(".alpha"):
            out[key] = torch.tensor(alpha, dtype=dtype)
            continue
        tensor = torch.randn(entry["shape"], generator=generator).to(dtype)
        fused = re.search(r"attn_qkv|linear1|qkv_lora", key) and key.endswith(("up.weight",))
        if block_diagonal and fused:
            parts = 4 if "linear1" in key else 3
            rows, rank = tensor.shape
            heights = [3072, 3072, 3072, rows - 9216] if parts == 4 else [rows // 3] * 3
            mask = torch.zeros_like(tensor)
            start = 0
            for j, height in enumerate(heights):
                mask[start : start + height, j * rank // parts : (j + 1) * rank // parts] = 1
                start += height
            tensor = tensor * mask
        out[key] = tensor
    return out


def _diffusers_te_name(key: str) -> str:
    """diffusers' kohya text-encoder keys (old ``to_q_lora.down`` / ``lora_linear_layer`` names) -> PEFT."""
    key = key.replace("text_encoder.text_model.", "text_encoder.")
    key = re.sub(r"self_attn\.to_(q|k|v)_lora\.", r"self_attn.\1_proj.", key)
    key = key.replace("self_attn.to_out_lora.", "self_attn.out_proj.").replace(".lora_linear_layer.", ".")
    return key.replace(".down.weight", ".lora_A.weight").replace(".up.weight", ".lora_B.weight")


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("name", "dtype", "alpha", "block_diagonal"),
    [
        ("invokeai_flux_lora_kohya_format", torch.float32, 8.0, False),
        ("invokeai_flux_lora_kohya_format", torch.bfloat16, 3.0, True),
        ("invokeai_flux_lora_kohya_with_te1_format", torch.float32, 3.0, True),
        ("invokeai_flux_lora_kohya_with_te1_format", torch.float16, 16.0, False),
        ("invokeai_flux_lora_xlabs_format", torch.float32, 1.0, False),
    ],
)
def test_lora_conversion_is_diffusers_bit_for_bit(
    name: str, dtype: torch.dtype, alpha: float, block_diagonal: bool
) -> None:
    from diffusers import FluxPipeline

    state_dict = _state_dict(name, dtype, alpha, block_diagonal)
    assert is_original_layout(FLUX, state_dict)
    # diffusers scales text-encoder factors in place: give it its own copies
    theirs = FluxPipeline.lora_state_dict({k: v.clone() for k, v in state_dict.items()})
    ours = convert_original_lora(FLUX, dict(state_dict), {"text_encoder": CLIP_L}, name)
    theirs = {(_diffusers_te_name(k) if k.startswith("text_encoder.") else k): v for k, v in theirs.items()}
    assert set(ours) == set(theirs)
    differing = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert differing == []
    fused = [k for k in ours if re.search(r"\.to_[qkv]\.|add_[qkv]_proj|proj_mlp", k)]
    assert fused  # the fused q/k/v (and linear1) were split


def test_final_layer_alpha_is_applied_where_diffusers_drops_it() -> None:
    """diffusers' kohya FLUX.1 converter ignores ``final_layer`` alphas ("TODO: alphas") and emits its
    keys without the ``transformer.`` prefix, so they would not load at all; lorarecipe applies alpha/rank
    as kohya and ComfyUI do, and swaps the adaLN halves (BFL shift|scale -> diffusers scale|shift)."""
    from diffusers import FluxPipeline

    generator = torch.Generator().manual_seed(1)
    state_dict = {}
    for stem, (out, inp) in {
        "final_layer_linear": (64, 3072),
        "final_layer_adaLN_modulation_1": (6144, 3072),
    }.items():
        state_dict[f"lora_unet_{stem}.lora_down.weight"] = torch.randn(4, inp, generator=generator)
        state_dict[f"lora_unet_{stem}.lora_up.weight"] = torch.randn(out, 4, generator=generator)
        state_dict[f"lora_unet_{stem}.alpha"] = torch.tensor(2.0)
    theirs = FluxPipeline.lora_state_dict(dict(state_dict))
    assert sorted(theirs) == sorted(  # no transformer. prefix: load_lora_weights would skip them
        f"{m}.lora_{ab}.weight" for m in ("proj_out", "norm_out.linear") for ab in "AB"
    )
    ours = convert_original_lora(FLUX, dict(state_dict), {}, "final")
    up = state_dict["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    down = state_dict["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"]
    delta = (
        ours["transformer.norm_out.linear.lora_B.weight"] @ ours["transformer.norm_out.linear.lora_A.weight"]
    )
    expected = 0.5 * torch.cat([up[3072:], up[:3072]]) @ down  # alpha 2 / rank 4
    torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(theirs["norm_out.linear.lora_B.weight"], torch.cat([up[3072:], up[:3072]]))  # no alpha


def test_unplaceable_keys_are_refused_not_dropped() -> None:
    from lorarecipe.errors import UnsafeInputError

    state_dict = {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(4, 3072),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(3072, 4),
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(4, 4096),
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(4096, 4),
    }
    with pytest.raises(UnsafeInputError, match=r"lora_te2_encoder_block_0_layer_0_SelfAttention_q.*dropped"):
        convert_original_lora(FLUX, state_dict, {"text_encoder": CLIP_L}, "t5.safetensors")


@pytest.fixture(scope="module")
def full_size_shapes() -> dict[str, tuple[int, ...]]:
    """FLUX.1-dev's transformer (19 double, 38 single blocks, 12 B parameters) on the meta device."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_single_file_names_are_diffusers_reader_inverse(full_size_shapes: dict[str, tuple[int, ...]]) -> None:
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    layout = single_file_layout("flux", {"transformer": full_size_shapes}, {})
    placed = [(p.component, p.key) for t in layout for p in t.sources]
    assert sorted(placed) == sorted(("transformer", k) for k in full_size_shapes)  # each key exactly once
    keys = {t.key for t in layout}
    assert "double_blocks.18.img_attn.qkv.weight" in keys and "single_blocks.37.linear1.weight" in keys
    assert not any(k.startswith(("transformer_blocks", "model.diffusion_model")) for k in keys)
    # diffusers' reader on the BFL layout (meta tensors: shapes only) gives back every key and shape
    checkpoint: dict[str, Any] = {t.key: torch.empty(t.shape, device="meta") for t in layout}
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert {k: tuple(v.shape) for k, v in converted.items()} == full_size_shapes
    assert checkpoint == {}  # the reader consumed every tensor written
