"""diffusers key → original LDM/SGM key, one component at a time: pure string work, never torch.

Input: one component's diffusers keys and shapes (plus its config); output: for every key the name it
is stored under in a single-file checkpoint (without the component prefix), its place in a dim-0
concatenation (OpenCLIP packs q, k, v into one ``in_proj``) and a shape transform, or ``None`` when
the key has no place (the caller reports it: weights are never dropped silently).

Each rule is the inverse of a reader in ``diffusers/loaders/single_file_utils.py`` (0.42.1), named at
the rule, so that a file written with these names reads back through ``from_single_file`` unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from ..families import Family, Split
from ..families.original_names import halves_swapped, original_place
from ..recipe.vocabulary import ValueEnum

__all__ = [
    "DERIVED",
    "Shape",
    "StoredForm",
    "Target",
    "map_hf_clip_keys",
    "map_open_clip_keys",
    "map_rule_keys",
    "map_unet_keys",
    "map_vae_keys",
]

Shape = tuple[int, ...]


class StoredForm(ValueEnum):
    """How a single file stores a diffusers tensor when not as it is (see ``singlefile.apply_transform``)."""

    CONV1X1 = "conv1x1"  # a Linear weight [o, i] stored as a 1×1 convolution [o, i, 1, 1] (VAE attention)
    TRANSPOSE = "transpose"  # [p, h] stored as [h, p] (OpenCLIP's text_projection)
    SWAP_HALVES = "swap_halves"  # rows [a; b] stored as [b; a] (FLUX.1's final adaLN: scale|shift)


class Target(NamedTuple):
    """Where one diffusers tensor goes: ``key`` (no component prefix), rows ``part`` of ``parts``
    equal-width parts concatenated along dim 0, and an optional ``transform`` of its shape."""

    key: str
    part: int = 0
    parts: int = 1
    transform: StoredForm | None = None


# A derived buffer with no counterpart in the original layout (OpenCLIP has no ``position_ids``:
# it is ``arange(77)``, rebuilt by transformers at construction), skipped on purpose, not unmapped.
DERIVED = Target("<derived buffer>")

_PARAM = r"(weight|bias)"

# ---------------------------------------------------------------------------------------------- UNet
# Inverse of convert_ldm_unet_checkpoint + update_unet_resnet_ldm_to_diffusers.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_LABEL_EMB = {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}
_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_DOWNSAMPLE = re.compile(rf"down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_PARAM}")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_UPSAMPLE = re.compile(rf"up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_PARAM}")
_MODULE_PARAM = re.compile(rf"(\w+)\.{_PARAM}")


def _layers_per_block(config: Mapping[str, Any]) -> int:
    lpb = config.get("layers_per_block", 2)  # UNet2DConditionModel's default
    if isinstance(lpb, (list, tuple)) and len(set(lpb)) == 1:
        raise ValueError(
            f"unet config: layers_per_block={list(lpb)!r}: diffusers' single-file reader computes "
            f"`layers_per_block + 1`, so write it as the integer {lpb[0]} in unet/config.json"
        )
    if not isinstance(lpb, int) or isinstance(lpb, bool) or lpb < 1:
        raise ValueError(
            f"unet config: layers_per_block={lpb!r}: the LDM layout numbers input/output blocks with "
            "one integer layers_per_block shared by all blocks"
        )
    return lpb


def _unet_fixed_names(config: Mapping[str, Any]) -> dict[str, str]:
    """Top-level modules; label_emb only where the reader looks for it (config-dependent)."""
    names = dict(_UNET_FIXED)
    if config.get("addition_embed_type") == "text_time":  # SDXL
        names.update({f"add_embedding.{k}": v for k, v in _UNET_LABEL_EMB.items()})
    if config.get("class_embed_type") in ("timestep", "projection"):
        names.update({f"class_embedding.{k}": v for k, v in _UNET_LABEL_EMB.items()})
    out = {f"{mod}.{p}": f"{ldm}.{p}" for mod, ldm in names.items() for p in ("weight", "bias")}
    if config.get("num_class_embeds") is not None:
        out["class_embedding.weight"] = "label_emb.weight"
    return out


def _unet_resnet(rest: str) -> str | None:
    m = _MODULE_PARAM.fullmatch(rest)
    ldm = _UNET_RESNET.get(m[1]) if m else None
    return f"{ldm}.{m[2]}" if m and ldm else None


def map_unet_keys(shapes: Mapping[str, Shape], config: Mapping[str, Any]) -> dict[str, Target | None]:
    """UNet2DConditionModel keys → ``input_blocks / middle_block / output_blocks`` keys.

    Down block ``b`` holds input blocks ``1 + b·(L+1) … 1 + b·(L+1) + L`` (L resnets, each with its
    attention at slot ``.1``, then the downsampler ``.0.op``); up block ``b`` holds output blocks
    ``b·(L+1) …`` (L+1 resnets; the upsampler sits at slot ``.2`` after an attention, else ``.1``).
    Attention internals keep their diffusers names, as in LDM's SpatialTransformer.
    """
    lpb = _layers_per_block(config)
    fixed = _unet_fixed_names(config)
    up_attention = {
        (int(m[1]), int(m[3])) for k in shapes if (m := _UP.fullmatch(k)) and m[2] == "attentions"
    }
    mid_kinds = {m[1] for k in shapes if (m := _MID.fullmatch(k))}
    if mid_kinds == {"resnets"}:
        raise ValueError(
            "unet: a mid block without attention (UNetMidBlock2D) has no single-file form diffusers "
            "can read: its reader takes middle_block.1 for the attention and never reads middle_block.2"
        )

    def target(key: str) -> str | None:
        if key in fixed:
            return fixed[key]
        if m := _DOWN.fullmatch(key):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            if layer >= lpb:
                return None
            index = 1 + block * (lpb + 1) + layer
            if kind == "attentions":
                return f"input_blocks.{index}.1.{rest}"
            resnet = _unet_resnet(rest)
            return resnet and f"input_blocks.{index}.0.{resnet}"
        if m := _DOWNSAMPLE.fullmatch(key):
            return f"input_blocks.{1 + int(m[1]) * (lpb + 1) + lpb}.0.op.{m[2]}"
        if m := _MID.fullmatch(key):
            kind, layer, rest = m[1], int(m[2]), m[3]
            if kind == "attentions":
                return f"middle_block.1.{rest}" if layer == 0 else None
            resnet = _unet_resnet(rest) if layer < 2 else None  # resnets 0, 1 → middle_block.0, .2
            return resnet and f"middle_block.{2 * layer}.{resnet}"
        if m := _UP.fullmatch(key):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            if layer > lpb:
                return None
            index = block * (lpb + 1) + layer
            if kind == "attentions":
                return f"output_blocks.{index}.1.{rest}"
            resnet = _unet_resnet(rest)
            return resnet and f"output_blocks.{index}.0.{resnet}"
        if m := _UPSAMPLE.fullmatch(key):
            block = int(m[1])
            slot = 2 if (block, lpb) in up_attention else 1
            return f"output_blocks.{block * (lpb + 1) + lpb}.{slot}.conv.{m[2]}"
        return None

    return {key: (Target(t) if (t := target(key)) else None) for key in shapes}


# ----------------------------------------------------------------------------------------------- VAE
# Inverse of convert_ldm_vae_checkpoint (+ update_vae_resnet/attentions_ldm_to_diffusers).
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# Mid-block attention; the right-hand old names are what diffusers < 0.14 saved (still found on disk).
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_VAE_TOP = re.compile(rf"((?:encoder|decoder)\.conv_(?:in|out)|(?:post_)?quant_conv)\.{_PARAM}")
_VAE_NORM_OUT = re.compile(rf"(encoder|decoder)\.conv_norm_out\.{_PARAM}")
_VAE_BLOCK = re.compile(rf"(encoder\.down|decoder\.up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.{_PARAM}")
_VAE_SAMPLER = re.compile(
    rf"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(?:down|up)samplers\.0\.conv\.{_PARAM}"
)
_VAE_MID_RESNET = re.compile(rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.{_PARAM}")
_VAE_MID_ATTENTION = re.compile(rf"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+|to_out\.0)\.{_PARAM}")


def map_vae_keys(shapes: Mapping[str, Shape], config: Mapping[str, Any]) -> dict[str, Target | None]:
    """AutoencoderKL keys → LDM ``encoder.down.{i}.block.{j}``, ``decoder.up.{n-1-i}.block.{j}``, ``mid.…``.

    LDM numbers decoder up blocks from the lowest resolution up (diffusers: from the highest down),
    and stores the mid-block attention projections as 1×1 convolutions ``[o, i, 1, 1]``, as the
    original checkpoints do (diffusers' reader squeezes either form back to ``[o, i]``).
    """
    blocks = {
        "encoder.down": len(config.get("down_block_types", ())),
        "decoder.up": len(config.get("up_block_types", ())),
    }
    if not all(blocks.values()):
        raise ValueError(
            "vae config: down_block_types/up_block_types missing; block numbering depends on them"
        )
    up_blocks = blocks["decoder.up"]

    def target(key: str, shape: Shape) -> Target | None:
        if _VAE_TOP.fullmatch(key):
            return Target(key)
        if m := _VAE_NORM_OUT.fullmatch(key):
            return Target(f"{m[1]}.norm_out.{m[2]}")
        if m := _VAE_BLOCK.fullmatch(key):
            part, block, layer, module, param = m[1], int(m[2]), m[3], _VAE_RESNET.get(m[4]), m[5]
            if module is None or block >= blocks[part]:
                return None
            block = up_blocks - 1 - block if part == "decoder.up" else block
            return Target(f"{part}.{block}.block.{layer}.{module}.{param}")
        if m := _VAE_SAMPLER.fullmatch(key):
            part, block = m[1], int(m[2])
            if block >= blocks[part]:
                return None
            if part == "decoder.up":
                return Target(f"decoder.up.{up_blocks - 1 - block}.upsample.conv.{m[3]}")
            return Target(f"encoder.down.{block}.downsample.conv.{m[3]}")
        if m := _VAE_MID_RESNET.fullmatch(key):
            module = _VAE_RESNET.get(m[3])
            return Target(f"{m[1]}.mid.block_{int(m[2]) + 1}.{module}.{m[4]}") if module else None
        if m := _VAE_MID_ATTENTION.fullmatch(key):
            module = _VAE_ATTENTION.get(m[2])
            if module is None:
                return None
            conv = module != "norm" and m[3] == "weight" and len(shape) == 2
            return Target(
                f"{m[1]}.mid.attn_1.{module}.{m[3]}", transform=StoredForm.CONV1X1 if conv else None
            )
        return None

    return {key: target(key, shape) for key, shape in shapes.items()}


# ------------------------------------------------------------------------------------- text encoders
_HF_CLIP_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


def map_hf_clip_keys(shapes: Mapping[str, Shape]) -> dict[str, Target | None]:
    """CLIPTextModel(WithProjection) keys → HF names under ``text_model.`` (SD1, SDXL's CLIP-L).

    transformers 5 flattened CLIPTextModel (``encoder.layers.0…``), but the single-file layout keeps
    ``text_model.encoder.layers.0…``: convert_ldm_clip_checkpoint only strips the component prefix,
    and create_diffusers_clip_model_from_ldm strips ``text_model.`` again for flattened models.
    ``position_ids`` is kept when present, as in the original SD1.x files (the reader ignores it).
    """

    def target(key: str) -> Target | None:
        if key == "text_projection.weight":
            return Target(key)
        body = key.removeprefix("text_model.")
        return Target(f"text_model.{body}") if body.startswith(_HF_CLIP_ROOTS) else None

    return {key: target(key) for key in shapes}


_OPEN_CLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
_HF_LAYER = re.compile(rf"encoder\.layers\.(\d+)\.(.+)\.{_PARAM}")


def map_open_clip_keys(shapes: Mapping[str, Shape]) -> dict[str, Target | None]:
    """CLIPTextModel(WithProjection) keys → OpenCLIP names (SD2's ViT-H, SDXL's bigG).

    Inverse of convert_open_clip_checkpoint: q, k, v are rows ``[0:h] [h:2h] [2h:3h]`` of
    ``transformer.resblocks.N.attn.in_proj_{weight,bias}``; ``text_projection`` is stored as the
    matrix OpenCLIP multiplies by (``x @ P``), the transpose of the Linear weight.
    """

    def target(key: str) -> Target | None:
        if key == "text_projection.weight":
            return Target("text_projection", transform=StoredForm.TRANSPOSE)
        body = key.removeprefix("text_model.")
        if body == "embeddings.position_ids":
            return DERIVED
        if body in _OPEN_CLIP_FIXED:
            return Target(_OPEN_CLIP_FIXED[body])
        m = _HF_LAYER.fullmatch(body)
        if m is None:
            return None
        layer, module, param = m[1], m[2], m[3]
        if module in _OPEN_CLIP_QKV:
            return Target(f"transformer.resblocks.{layer}.attn.in_proj_{param}", _OPEN_CLIP_QKV[module], 3)
        renamed = _OPEN_CLIP_LAYER.get(module)
        return Target(f"transformer.resblocks.{layer}.{renamed}.{param}") if renamed else None

    return {key: target(key) for key in shapes}


# ------------------------------------------------------------------------------- table-driven (DiTs)


def map_rule_keys(family: Family, shapes: Mapping[str, Shape]) -> dict[str, Target | None]:
    """A DiT's diffusers keys -> the family's original names, from its ModuleRule/ParamRule tables
    (FLUX.1: the inverse of convert_flux_transformer_checkpoint_to_diffusers; fused q/k/v and
    ``linear1`` parts are rows of one tensor, ``final_layer.adaLN_modulation.1`` has its halves swapped;
    SD 3's last context adaLN too, told by its weight's shape; families that keep names pass the rest)."""
    out: dict[str, Target | None] = {}
    for key in shapes:
        place = original_place(family, key)
        if place is None:
            out[key] = None
            continue
        weight = shapes.get(key.rsplit(".", 1)[0] + ".weight", shapes[key])  # a bias swaps as its weight
        swapped = len(weight) == 2 and halves_swapped(place.split, weight[1], weight[0])
        swapped = swapped or place.split is Split.SWAP_HALVES
        out[key] = Target(place.key, place.part, place.parts, StoredForm.SWAP_HALVES if swapped else None)
    return out
