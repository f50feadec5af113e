"""LoRA files named in a family's original layout -> the diffusers/PEFT layout, with diffusers' float ops.

Families whose diffusers loader cannot read all of their original names convert here: FLUX.1; SD 3,
whose loader reads diffusers keys only (kohya sd-scripts' ``lora_unet_joint_blocks_0_x_block_attn_qkv``,
CLIPs as ``lora_te1_``/``lora_te2_``); Z-Image, whose loader splits ``layers_0_attention_qkv`` but
drops the original ``x_embedder``/``final_layer`` (modules its table does not rename keep their
diffusers names). A FLUX.1 LoRA in kohya/ComfyUI names
(``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``), ai-toolkit names
(``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``) or XLabs names
(``double_blocks.0.processor.qkv_lora1.down.weight``), plus kohya CLIP keys (``lora_te1_…``) ->
``transformer.<module>.lora_A/B.weight`` and ``text_encoder.<module>.lora_A/B.weight`` for
``load_lora_weights``, with alpha/rank folded into the factors as diffusers does (alpha = rank after).

The arithmetic is diffusers 0.42.1's own (``_convert_kohya_flux_lora_to_diffusers``,
``_convert_xlabs_flux_lora_to_diffusers``), operation for operation — the power-of-two split of
alpha/rank between down and up, a tensor scale for fused modules and a Python float otherwise, the
block-diagonal ("sparse") detection of fused ``up`` weights — so a full-size file gives bit-identical
factors (``tests/test_flux_conversion.py``). lorarecipe does it itself because diffusers' converter
hard-codes FLUX.1-dev's widths (3072/12288), drops the alpha of ``final_layer`` modules (applied
here, as kohya and ComfyUI do), ignores ai-toolkit's files and drops unknown keys with a log line
(refused here). The module names come from the family table; nothing is guessed from substrings.

The same tables convert FLUX.2 (kohya/musubi and ai-toolkit BFL names: diffusers' converters drop the
shared modulation, guidance embedder and final layer from kohya files, and map ai-toolkit's final
adaLN without swapping its halves) and Wan (musubi-tuner ``lora_unet_blocks_0_self_attn_q`` and ComfyUI
``diffusion_model.blocks.0.self_attn.q``: diffusers' musubi converter fails on files with embedders,
its ComfyUI one on alphas outside the blocks), with the same float operations, so where diffusers'
converters are right the factors are bit-identical to theirs (``tests/test_dit_conversion.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import UnsafeInputError
from ..families import Family
from ..families.original_names import halves_swapped, match_lora_module, split_heights

__all__ = ["convert_original_lora", "is_original_layout"]

_KEY = re.compile(
    r"^(?P<stem>.+?)\.(?P<role>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|down\.weight"
    r"|up\.weight|alpha)$"
)
_ROLE = {
    "lora_down.weight": "down",
    "lora_A.weight": "down",
    "down.weight": "down",
    "lora_up.weight": "up",
    "lora_B.weight": "up",
    "up.weight": "up",
    "alpha": "alpha",
}


def _denoiser_name(family: Family, stem: str) -> str | None:
    """A key stem -> the original-layout module name it carries, or None (another component/layout)."""
    for prefix in (family.kohya_prefixes.get(family.denoiser, "lora_unet") + "_", "diffusion_model.", ""):
        if stem.startswith(prefix) and match_lora_module(family, stem[len(prefix) :]) is not None:
            return stem[len(prefix) :]
    return None


def is_original_layout(family: Family, keys: Iterable[str]) -> bool:
    """Whether a LoRA file's keys name denoiser modules in the family's original layout (so
    lorarecipe converts it), judged by every key with a LoRA role."""
    if not family.converts_original_loras:
        return False
    stems = [m.group("stem") for key in keys if (m := _KEY.match(key))]
    return any(_denoiser_name(family, stem) is not None for stem in stems)


def _split_scale(scale: Any) -> tuple[Any, Any]:
    """diffusers' split of alpha/rank into a down and an up factor (powers of two apart)."""
    scale_down, scale_up = scale, 1.0
    while scale_down * 2 < scale_up:
        scale_down *= 2
        scale_up /= 2
    return scale_down, scale_up


def _scaled(parts: Mapping[str, Any], fused: bool) -> tuple[Any, Any]:
    """(down, up) with alpha/rank folded in: a tensor scale in alpha's dtype for fused modules
    (``_convert_to_ai_toolkit_cat``), a Python float otherwise (``_convert_to_ai_toolkit``)."""
    import torch

    down, up = parts["down"], parts["up"]
    rank = down.shape[0]
    default = torch.tensor(rank, dtype=down.dtype, device=down.device, requires_grad=False)
    alpha = parts.get("alpha", default)
    scale = alpha / rank if fused else alpha.item() / rank
    scale_down, scale_up = _split_scale(scale)
    return down * scale_down, up * scale_up


def _block_diagonal(up: Any, heights: tuple[int, ...], rank: int) -> bool:
    """diffusers' "sparse" test: a fused up weight whose off-diagonal rank blocks are all zero."""
    import torch

    parts = len(heights)
    if rank % parts:
        return False
    width, start = rank // parts, 0
    for j, height in enumerate(heights):
        for k in range(parts):
            if k != j and not bool(torch.all(up[start : start + height, k * width : (k + 1) * width] == 0)):
                return False
        start += height
    return True


def _denoiser_factors(family: Family, name: str, parts: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One original-layout module's factors -> diffusers ``<module>.lora_A/B.weight`` entries."""
    import torch

    match = match_lora_module(family, name)
    assert match is not None
    if "down" not in parts or "up" not in parts:
        raise UnsafeInputError(f"{where}: module {name!r} lacks its down or up weight")
    xlabs = ".processor." in match.original  # XLabs files carry no alpha; diffusers applies none
    fused = len(match.diffusers) > 1
    down, up = (parts["down"], parts["up"]) if xlabs else _scaled(parts, fused)
    if halves_swapped(match.split, down.shape[1], up.shape[0]):  # shift|scale -> diffusers scale|shift
        shift, scale = up.chunk(2, dim=0)
        up = torch.cat([scale, shift], dim=0)
    heights = split_heights(match.split, len(match.diffusers), down.shape[1], up.shape[0])
    if heights is None:
        raise UnsafeInputError(
            f"{where}: module {name!r} of shape {list(up.shape)} cannot be split for {match.original}"
        )
    out: dict[str, Any] = {}
    if not fused:
        module = match.diffusers[0]
        return {
            f"{family.denoiser}.{module}.lora_A.weight": down,
            f"{family.denoiser}.{module}.lora_B.weight": up,
        }
    rank = down.shape[0]
    sparse = not xlabs and _block_diagonal(up, heights, rank)
    downs = torch.chunk(down, len(heights), dim=0) if sparse else (down,) * len(heights)
    start = 0
    for j, (module, height) in enumerate(zip(match.diffusers, heights, strict=True)):
        if sparse:
            width = rank // len(heights)
            piece = up[start : start + height, j * width : (j + 1) * width]
        else:
            piece = up[start : start + height]
        # copies, not views of one tensor: PEFT may keep them as they are (assign), and tensors that
        # share memory cannot be saved (LoRA files, the factor cache)
        out[f"{family.denoiser}.{module}.lora_A.weight"] = downs[j].clone(
            memory_format=torch.contiguous_format
        )
        out[f"{family.denoiser}.{module}.lora_B.weight"] = piece.clone(memory_format=torch.contiguous_format)
        start += height
    return out


def _flat_index(names: Iterable[str]) -> dict[str, str]:
    """Text-encoder module names -> {kohya flattened name: module name}, with and without ``text_model``."""
    index: dict[str, str] = {}
    for name in names:
        flat = name.replace(".", "_")
        index.setdefault(flat, name)
        index.setdefault(
            flat.removeprefix("text_model_") if flat.startswith("text_model_") else "text_model_" + flat, name
        )
    return index


def _text_encoder_factors(parts: Mapping[str, Any]) -> tuple[Any, Any]:
    """kohya text-encoder factors with diffusers' in-place alpha folding (none without an alpha key)."""
    down, up = parts["down"].clone(), parts["up"].clone()
    if "alpha" in parts:
        scale_down, scale_up = _split_scale(parts["alpha"].item() / down.shape[0])
        down *= scale_down
        up *= scale_up
    return down, up


def _kept_name(family: Family, stem: str, index: Mapping[str, str]) -> str | None:
    """A denoiser module the original layout names as diffusers does (Z-Image's ``feed_forward.w1``),
    kohya-flattened or dotted, ``lora_unet_``/``diffusion_model.`` prefixed -> its module name."""
    for prefix in (family.kohya_prefixes.get(family.denoiser, "lora_unet") + "_", "diffusion_model."):
        if stem.startswith(prefix) and stem[len(prefix) :].replace(".", "_") in index:
            return index[stem[len(prefix) :].replace(".", "_")]
    return None


def convert_original_lora(
    family: Family,
    state_dict: Mapping[str, Any],
    component_modules: Mapping[str, Iterable[str]],
    where: str,
) -> dict[str, Any]:
    """A LoRA state dict in the family's original layout -> diffusers/PEFT keys (see the module docstring).

    ``component_modules``: component -> its module names, to place kohya text-encoder keys (and, for a
    family whose original layout keeps diffusers' names outside its rules, the denoiser's). Every
    key must land somewhere: an unknown key, a module without its pair, a shape that cannot be
    split raise ``UnsafeInputError`` naming it (diffusers would drop it with a log line).
    """
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in state_dict.items():
        found = _KEY.match(key)
        if found is None:
            raise UnsafeInputError(f"{where}: key {key!r} is not a LoRA factor or alpha; it would be dropped")
        groups.setdefault(found.group("stem"), {})[_ROLE[found.group("role")]] = tensor
    te_prefixes = {
        prefix + "_": component
        for component, prefix in family.kohya_prefixes.items()
        if component != family.denoiser
    }
    te_prefixes.setdefault(
        "lora_te_", "text_encoder"
    )  # kohya's single-encoder spelling, read as diffusers does
    indexes = {component: _flat_index(names) for component, names in component_modules.items()}
    kept = indexes.get(family.denoiser, {}) if family.original_keeps_names else {}
    out: dict[str, Any] = {}
    for stem, parts in groups.items():
        name = _denoiser_name(family, stem)
        if name is not None:
            out.update(_denoiser_factors(family, name, parts, where))
            continue
        module = _kept_name(family, stem, kept) if kept else None
        if module is not None and "down" in parts and "up" in parts:
            down, up = _scaled(parts, fused=False)
            out[f"{family.denoiser}.{module}.lora_A.weight"] = down
            out[f"{family.denoiser}.{module}.lora_B.weight"] = up
            continue
        prefix = next((p for p in sorted(te_prefixes, key=len, reverse=True) if stem.startswith(p)), None)
        component = te_prefixes.get(prefix or "")
        module = indexes.get(component or "", {}).get(stem[len(prefix or "") :])
        if component is None or module is None or "down" not in parts or "up" not in parts:
            raise UnsafeInputError(
                f"{where}: LoRA module {stem!r} has no place in {family.label}'s {family.denoiser} or text "
                "encoder; it would be dropped"
            )
        down, up = _text_encoder_factors(parts)
        out[f"{component}.{module}.lora_A.weight"] = down
        out[f"{component}.{module}.lora_B.weight"] = up
    return out
