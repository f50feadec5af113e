"""An independent reading of FLUX.2 and Wan LoRA files: the delta each adds to each transformer weight.

Shares no code with lorarecipe's family tables or converters, nor with diffusers': this module has its
own table of each original layout (written from the papers' reference code names: Black Forest Labs'
``double_blocks.{i}.img_attn.qkv``, Wan-AI's ``blocks.{i}.self_attn.q``), parses every key layout with its
own regular expressions (kohya/musubi ``lora_unet_`` with underscores, ai-toolkit/ComfyUI
``diffusion_model.``, bare PEFT ``base_model.model.``, diffusers ``transformer.``), reads alpha from the
file (``.alpha`` tensors, PEFT ``lora_adapter_metadata``, else alpha = rank) and computes
``delta = alpha / rank · up @ down`` in float64. A fused original weight's delta is split by rows onto
its diffusers parts (FLUX.2 ``qkv``: equal thirds); ``final_layer.adaLN_modulation.1`` has its row
halves swapped (BFL shift|scale, diffusers scale|shift).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorarecipe.outputs.safetensors_meta import read_metadata
from tests.helpers.lora_math import LoraFactors

# original name ({i}: the block index) -> diffusers module(s); several = fused, split equally
FLUX2 = {
    "double_blocks.{i}.img_attn.qkv": (
        "transformer_blocks.{i}.attn.to_q",
        "transformer_blocks.{i}.attn.to_k",
        "transformer_blocks.{i}.attn.to_v",
    ),
    "double_blocks.{i}.txt_attn.qkv": (
        "transformer_blocks.{i}.attn.add_q_proj",
        "transformer_blocks.{i}.attn.add_k_proj",
        "transformer_blocks.{i}.attn.add_v_proj",
    ),
    "double_blocks.{i}.img_attn.proj": ("transformer_blocks.{i}.attn.to_out.0",),
    "double_blocks.{i}.txt_attn.proj": ("transformer_blocks.{i}.attn.to_add_out",),
    "double_blocks.{i}.img_mlp.0": ("transformer_blocks.{i}.ff.linear_in",),
    "double_blocks.{i}.img_mlp.2": ("transformer_blocks.{i}.ff.linear_out",),
    "double_blocks.{i}.txt_mlp.0": ("transformer_blocks.{i}.ff_context.linear_in",),
    "double_blocks.{i}.txt_mlp.2": ("transformer_blocks.{i}.ff_context.linear_out",),
    "single_blocks.{i}.linear1": ("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj",),
    "single_blocks.{i}.linear2": ("single_transformer_blocks.{i}.attn.to_out",),
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_guidance_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_guidance_embed.timestep_embedder.linear_2",),
    "guidance_in.in_layer": ("time_guidance_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_guidance_embed.guidance_embedder.linear_2",),
    "double_stream_modulation_img.lin": ("double_stream_modulation_img.linear",),
    "double_stream_modulation_txt.lin": ("double_stream_modulation_txt.linear",),
    "single_stream_modulation.lin": ("single_stream_modulation.linear",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
WAN = {
    **{
        f"blocks.{{i}}.self_attn.{o}": (f"blocks.{{i}}.attn1.{d}",)
        for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))
    },
    **{
        f"blocks.{{i}}.cross_attn.{o}": (f"blocks.{{i}}.attn2.{d}",)
        for o, d in (
            ("q", "to_q"),
            ("k", "to_k"),
            ("v", "to_v"),
            ("o", "to_out.0"),
            ("k_img", "add_k_proj"),
            ("v_img", "add_v_proj"),
        )
    },
    "blocks.{i}.ffn.0": ("blocks.{i}.ffn.net.0.proj",),
    "blocks.{i}.ffn.2": ("blocks.{i}.ffn.net.2",),
    "text_embedding.0": ("condition_embedder.text_embedder.linear_1",),
    "text_embedding.2": ("condition_embedder.text_embedder.linear_2",),
    "time_embedding.0": ("condition_embedder.time_embedder.linear_1",),
    "time_embedding.2": ("condition_embedder.time_embedder.linear_2",),
    "time_projection.1": ("condition_embedder.time_proj",),
    "head.head": ("proj_out",),
    "img_emb.proj.1": ("condition_embedder.image_embedder.ff.net.0.proj",),  # I2V: CLIP image features
    "img_emb.proj.3": ("condition_embedder.image_embedder.ff.net.2",),
}
TABLES = {"flux2": FLUX2, "wan": WAN}

_ROLE = re.compile(
    r"^(?P<stem>.+)\.(?P<role>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha)$"
)


def _original(table: dict[str, tuple[str, ...]], name: str) -> tuple[str, ...] | None:
    """A module name in the original layout (dots, or kohya's underscores) -> its diffusers modules."""
    for original, targets in table.items():
        pattern = "^" + re.escape(original).replace(r"\{i\}", r"(\d+)").replace(r"\.", "[._]") + "$"
        if found := re.match(pattern, name):
            index = found.group(1) if found.groups() else ""
            return tuple(t.replace("{i}", index) for t in targets)
    return None


def _targets(family: str, stem: str) -> tuple[tuple[str, ...], bool]:
    """A key stem -> (the diffusers modules its delta goes to, whether halves are swapped)."""
    for prefix in ("transformer.", "base_model.model."):
        if stem.startswith(prefix):
            return (stem[len(prefix) :],), False
    for prefix in ("lora_unet_", "diffusion_model."):
        if stem.startswith(prefix):
            found = _original(TABLES[family], stem[len(prefix) :])
            assert found is not None, f"{stem}: not a {family} module"
            return found, stem.endswith("adaLN_modulation_1") or stem.endswith("adaLN_modulation.1")
    raise AssertionError(f"unexpected key stem {stem}")


def dit_factors(path: Path, family: str, base: Mapping[str, torch.Tensor]) -> dict[str, LoraFactors]:
    """diffusers weight key -> the file's factors for that weight (a fused original weight's ``up`` rows
    split onto its parts; the final adaLN's ``up`` halves swapped), with alpha and rank."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        found = _ROLE.match(key)
        assert found is not None, key
        role = {
            "lora_down.weight": "down",
            "lora_A.weight": "down",
            "lora_up.weight": "up",
            "lora_B.weight": "up",
            "alpha": "alpha",
        }[found["role"]]
        groups.setdefault(found["stem"], {})[role] = tensor
    meta = read_metadata(path)
    peft = json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else {}
    out: dict[str, LoraFactors] = {}
    for stem, parts in groups.items():
        targets, swapped = _targets(family, stem)
        rank = parts["down"].shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(peft.get("transformer.lora_alpha", rank))
        up = parts["up"]
        if swapped:
            half = up.shape[0] // 2
            up = torch.cat([up[half:], up[:half]])
        start = 0
        for target in targets:
            height = base[f"{target}.weight"].shape[0]
            out[f"{target}.weight"] = LoraFactors(parts["down"], up[start : start + height], alpha, rank)
            start += height
        assert start == up.shape[0], stem
    return out


def _folded(factors: LoraFactors) -> LoraFactors:
    """The factors as loaded: an original-layout file's alpha/rank is folded into them, split between
    ``down`` and ``up`` by powers of two (the convention of diffusers' FLUX/Wan converters, which
    lorarecipe's follows), leaving alpha = rank. A factor-level merge (linear, TIES, DARE, magnitude
    pruning) sees these factors."""
    scale = factors.alpha / factors.rank
    down_scale, up_scale = scale, 1.0
    while down_scale * 2 < up_scale:
        down_scale, up_scale = down_scale * 2, up_scale / 2
    return LoraFactors(factors.down * down_scale, factors.up * up_scale, float(factors.rank), factors.rank)


def dit_reader(
    family: str,
) -> Callable[[Path, Mapping[str, Mapping[str, torch.Tensor]]], dict[tuple[str, str], LoraFactors]]:
    """A ``lora_factors``-like reader of this family's files (for the merge oracle): (component, key) ->
    factors as loaded (alphas of original-layout files folded in), for ``base``'s ``transformer``."""

    def read(
        path: Path, base: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> dict[tuple[str, str], LoraFactors]:
        factors = dit_factors(path, family, base["transformer"])
        original = any(k.startswith(("lora_unet_", "diffusion_model.")) for k in load_file(str(path)))
        return {("transformer", k): _folded(f) if original else f for k, f in factors.items()}

    return read


def dit_deltas(path: Path, family: str, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers weight key -> float64 delta of one FLUX.2/Wan LoRA file at weight 1 (heights of fused
    parts read from ``base``, the transformer's tensors)."""
    return {key: f.delta(base[key].shape) for key, f in dit_factors(path, family, base).items()}
