"""An adapter's PEFT layers -> a kohya/ComfyUI-layout LoRA state dict, with each module's own alpha.

UNet families and Qwen-Image: ``lora_unet_<module>`` / ``lora_te…_<module>`` with dots as underscores
(diffusers' ``convert_state_dict_to_kohya`` assumes alpha = rank; here each module keeps its alpha).
Families with an original-layout table (FLUX.1, SD 3, Z-Image): the denoiser in the original names
ComfyUI and sd-scripts read, ``lora_unet_double_blocks_0_img_attn_qkv`` (modules the table does not
rename keep their names where the family says so), where a fused module's LoRA is the parts' LoRAs
side by side: ``down`` = the parts' ``A`` stacked (rank Σr), ``up`` = their ``B`` block-diagonal,
so diffusers' converter (its "sparse" case) and ComfyUI split it back into exactly the same factors.
Parts of a fused module the adapter does not have get zero factors; parts with different scales
have them folded into their ``up`` block (alpha = rank). Every LoRA layer must find a name, or the
export fails naming it.
"""

from __future__ import annotations

import math
from typing import Any

from ...errors import BuildError
from ...families import Family, get_family
from ...families.original_names import halves_swapped

__all__ = ["kohya_state_dict"]


def _layers(model: Any, adapter: str) -> dict[str, Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {})
    }


def _factors(module: Any, adapter: str) -> tuple[Any, Any, float, int]:
    """(A, B, alpha, rank) as stored; SVD merges leave non-contiguous factors, which save_file refuses."""
    a = module.lora_A[adapter].weight.detach().contiguous().clone()
    b = module.lora_B[adapter].weight.detach().contiguous().clone()
    rank = int(module.r[adapter])
    alpha = float(module.lora_alpha[adapter])
    if module.use_rslora.get(adapter, False):  # kohya has no rsLoRA: the same scale as alpha' / r
        alpha = alpha / math.sqrt(rank) * rank
    return a, b, alpha, rank


def _entry(key: str, down: Any, up: Any, alpha: float) -> dict[str, Any]:
    import torch

    return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}


def _fused(
    parts: list[tuple[Any, Any, float, int] | None], heights: list[int], width: int
) -> tuple[Any, Any, float]:
    """Per-part (A, B, alpha, rank) (None: the adapter lacks that part) -> one block-diagonal LoRA."""
    import torch

    present = [p for p in parts if p is not None]
    ranks = {p[3] for p in present}
    rank = present[0][3] if len(ranks) == 1 else None
    same_scale = len({(p[2], p[3]) for p in present}) == 1
    filled: list[tuple[Any, Any, float, int]] = []
    for part, height in zip(parts, heights, strict=True):
        if part is None:
            r = rank or 1
            dtype = present[0][0].dtype
            filled.append(
                (torch.zeros(r, width, dtype=dtype), torch.zeros(height, r, dtype=dtype), float(r), r)
            )
        else:
            filled.append(part)
    total = sum(p[3] for p in filled)
    down = torch.cat([p[0] for p in filled], dim=0)
    up = torch.zeros(sum(heights), total, dtype=down.dtype)
    row = col = 0
    for (_, b, alpha, r), height in zip(filled, heights, strict=True):
        block = b if same_scale else b * (alpha / r)
        up[row : row + height, col : col + r] = block
        row, col = row + height, col + r
    alpha = present[0][2] * len(parts) if same_scale and rank is not None else float(total)
    return down, up, alpha


def _denoiser(family: Family, model: Any, adapter: str, prefix: str) -> dict[str, Any]:
    """The denoiser's layers in the family's original names (see the module docstring)."""
    import torch

    layers = _layers(model, adapter)
    modules = dict(model.named_modules())
    out: dict[str, Any] = {}
    done: set[str] = set()
    for rule in family.original_modules:
        for index in range(10_000) if "{i}" in rule.original else (None,):
            names = [d.replace("{i}", str(index)) for d in rule.diffusers]
            if index is not None and names[0] not in modules:
                break
            if not any(n in layers for n in names):
                continue
            key = f"{prefix}_" + rule.original.replace("{i}", str(index)).replace(".", "_")
            if len(names) == 1:
                a, b, alpha, _ = _factors(layers[names[0]], adapter)
                if halves_swapped(rule.split, a.shape[1], b.shape[0]):  # diffusers scale|shift -> shift|scale
                    scale, shift = b.chunk(2, dim=0)
                    b = torch.cat([shift, scale], dim=0)
                out.update(_entry(key, a, b, alpha))
            else:
                bases = [modules[n].get_base_layer() if n in layers else modules[n] for n in names]
                heights = [int(m.out_features) for m in bases]
                parts = [_factors(layers[n], adapter) if n in layers else None for n in names]
                width = next(p[0].shape[1] for p in parts if p is not None)
                out.update(_entry(key, *_fused(parts, heights, width)))
            done.update(n for n in names if n in layers)
    if family.original_keeps_names:  # modules no rule renames keep their (flattened) diffusers names
        for name in sorted(set(layers) - done):
            a, b, alpha, _ = _factors(layers[name], adapter)
            out.update(_entry(f"{prefix}_{name.replace('.', '_')}", a, b, alpha))
            done.add(name)
    missing = sorted(set(layers) - done)
    if missing:
        raise BuildError(
            f"adapter {adapter!r}: {len(missing)} {family.denoiser} modules have no {family.label} "
            "kohya name: " + ", ".join(missing[:5])
        )
    return out


def _flattened(model: Any, adapter: str, prefix: str, text_encoder: bool) -> dict[str, Any]:
    """UNet or text-encoder layers under kohya's flattened module names (TE: one ``text_model_``)."""
    out: dict[str, Any] = {}
    for name, module in _layers(model, adapter).items():
        module_name = name if not text_encoder or name.startswith("text_model.") else f"text_model.{name}"
        a, b, alpha, _ = _factors(module, adapter)
        out.update(_entry(f"{prefix}_{module_name.replace('.', '_')}", a, b, alpha))
    return out


def kohya_state_dict(
    pipe: Any, adapter: str, family_key: str | None, models: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An adapter's PEFT layers -> kohya/ComfyUI keys for every component the family names a prefix for
    (``models``: component -> the model holding its layers, when not the pipeline's own: one expert of
    Wan 2.2 A14B written under the transformer's names)."""
    family = get_family(family_key) or get_family("sd1")
    assert family is not None
    out: dict[str, Any] = {}
    for component, prefix in family.kohya_prefixes.items():
        model = (models or {}).get(component) if models is not None else getattr(pipe, component, None)
        if model is None:
            continue
        if component == family.denoiser and family.original_modules:
            out.update(_denoiser(family, model, adapter, prefix))
        else:
            out.update(_flattened(model, adapter, prefix, component != family.denoiser))
    if not out:
        raise BuildError(f"adapter {adapter!r} has no LoRA layers to export in kohya layout")
    return out
