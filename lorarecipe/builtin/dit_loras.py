"""Random, seeded LoRA files for the DiT built-ins in the layouts their trainers write.

Input: a pipeline (its modules' names and shapes only), a family, a layout, rank/alpha/seed. Output:
one ``.safetensors`` file, byte-identical for equal inputs. Two writers, by how the family's trainers
name modules:

``make_dit_lora`` (Qwen-Image, Z-Image, SD 3):

- ``peft``: diffusers' ``save_lora_weights`` (``transformer.<module>.lora_A.weight``, alpha in the
  ``lora_adapter_metadata`` header), attention and MLP projections (+ the CLIPs for SD 3);
- ``kohya``: what kohya sd-scripts/musubi write for the family, ``lora_unet_<module>`` + ``.alpha`` for
  every Linear of the transformer: diffusers' module names (Qwen-Image, Z-Image), or the original
  names of the family table where its trainers use them (SD 3's ``joint_blocks_0_x_block_attn_qkv``,
  fused q/k/v as one module, plus ``lora_te1_``/``lora_te2_`` CLIPs);
- ``comfy``: the original names with a fused ``qkv`` (musubi's Z-Image ComfyUI layout);
- ``aitk``: ai-toolkit/ComfyUI ``diffusion_model.<module>.lora_A.weight``, no alpha;
- ``diffsynth``: DiffSynth-Studio's PEFT keys ``<module>.lora_A.default.weight``, no alpha;
- ``bare``: ``<module>.lora_down.weight`` + ``.alpha`` without a prefix (InvokeAI's Qwen-Image fixture).

``make_original_lora`` (FLUX.2, Wan: trainers name modules in the original BFL/Wan layout, from the
family table's ``ModuleRule`` s; a fused original module is as tall as its diffusers parts summed,
FLUX.2's ``qkv``); their ``peft`` files are written by ``loras.make_peft_lora`` with
``FLUX2_WAN_PEFT_TARGETS``:

- ``kohya`` (kohya/musubi-tuner, read by ComfyUI and diffusers): ``lora_unet_<original, dots as
  underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``;
- ``aitk`` (ai-toolkit): ``diffusion_model.<original>.lora_A.weight`` / ``.lora_B.weight``, no alpha;
- ``comfy`` (ComfyUI-format Wan LoRAs): ``diffusion_model.<original>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha``;
- ``peft_raw`` (saved from a bare PEFT model): ``base_model.model.<diffusers module>.lora_A.weight`` /
  ``.lora_B.weight``, no alpha (FLUX.2's loader reads it); ``select`` then sees diffusers names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..families import FAMILIES, Family
from ..families.original_names import original_place
from .lora_tensors import (
    kohya_tensors,
    random_factors,
    rule_modules,
    save_lora_file,
    text_encoder_kohya_tensors,
)
from .loras import make_peft_lora

__all__ = [
    "DIT_PEFT_TARGETS",
    "FLUX2_WAN_LAYOUTS",
    "FLUX2_WAN_PEFT_TARGETS",
    "default_selection",
    "make_dit_lora",
    "make_original_lora",
    "original_modules",
]

#: PEFT target_modules of the built-in PEFT-layout LoRAs: attention and MLP projections.
DIT_PEFT_TARGETS: dict[str, tuple[str, ...]] = {
    "qwen_image": (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    ),
    "z_image": ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"),
    "sd3": (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ),
}
#: families whose kohya trainer names modules in the original layout (sd-scripts' SD 3 MMDiT); musubi
#: names Qwen-Image's and Z-Image's as diffusers does
_KOHYA_ORIGINAL = ("sd3",)


def _linears(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            yield name, module


def _wanted(family: Family, layout: str, name: str) -> bool:
    """Which transformer modules a layout adapts: every Linear (kohya, comfy), else the attention and
    MLP projections."""
    if layout in ("kohya", "comfy"):
        return True
    in_block = any(name.startswith(g.module_prefix + ".") for g in family.block_groups)
    return in_block and any(name == t or name.endswith("." + t) for t in DIT_PEFT_TARGETS[family.key])


def _original_modules(
    family: Family, transformer: torch.nn.Module, wanted: Callable[[str], bool]
) -> dict[str, list[Any]]:
    """Original-layout module name -> [in_features, [out_features of each part in order]]."""
    fused: dict[str, list[Any]] = {}
    for name, module in _linears(transformer):
        if not wanted(name):
            continue
        place = original_place(family, f"{name}.weight")
        if place is None:
            raise ValueError(f"{family.label}: {name} has no original-layout name")
        entry = fused.setdefault(place.key.removesuffix(".weight"), [module.in_features, [0] * place.parts])
        entry[1][place.part] = module.out_features
    return fused


def _keyed(layout: str, name: str, down: Any, up: Any, alpha: float) -> dict[str, Any]:
    """One transformer module's factors under the layout's key names."""
    if layout in ("kohya", "comfy"):
        return kohya_tensors("lora_unet_" + name.replace(".", "_"), down, up, alpha)
    if layout == "bare":
        return kohya_tensors(name, down, up, alpha)
    if layout == "aitk":
        return {f"diffusion_model.{name}.lora_A.weight": down, f"diffusion_model.{name}.lora_B.weight": up}
    if layout == "diffsynth":
        return {f"{name}.lora_A.default.weight": down, f"{name}.lora_B.default.weight": up}
    raise ValueError(f"unknown DiT LoRA layout {layout!r}")


def make_dit_lora(
    pipe: Any,
    path: Path,
    *,
    family: str,
    layout: str,
    rank: int,
    alpha: float,
    seed: int,
    text_encoders: bool = True,
    scale: float = 0.2,
    select: Callable[[str], bool] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """DiT pipeline + family + layout + rank/alpha/seed -> ``path`` (see the module docstring).
    ``select``: which transformer modules (diffusers names) to adapt instead of the layout's usual set;
    ``dtype``: of the factors (not ``peft``)."""
    info = FAMILIES[family]
    path = Path(path)
    if layout == "peft":
        return make_peft_lora(
            pipe,
            path,
            rank=rank,
            alpha=alpha,
            seed=seed,
            targets=DIT_PEFT_TARGETS[family],
            text_encoders=text_encoders,
        )
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Any] = {}
    wanted = select or (lambda name: _wanted(info, layout, name))
    original = layout == "comfy" or (layout == "kohya" and family in _KOHYA_ORIGINAL)
    if original:
        for name, (inp, heights) in _original_modules(info, pipe.transformer, wanted).items():
            down, up = random_factors(generator, rank, inp, sum(heights), scale, dtype)
            tensors.update(_keyed(layout, name, down, up, alpha))
    else:
        for name, module in _linears(pipe.transformer):
            if wanted(name):
                down, up = random_factors(
                    generator, rank, module.in_features, module.out_features, scale, dtype
                )
                tensors.update(_keyed(layout, name, down, up, alpha))
    if layout == "kohya" and text_encoders:  # CLIPs as kohya names them: one 'text_model_' segment
        for component, prefix in info.kohya_prefixes.items():
            model = getattr(pipe, component) if component != info.denoiser else None
            if model is not None:
                tensors.update(
                    text_encoder_kohya_tensors(model, prefix, generator, rank=rank, alpha=alpha, scale=scale)
                )
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
    }
    return save_lora_file(tensors, path, metadata if layout in ("kohya", "comfy") else {})


# FLUX.2 and Wan: original-layout names from the family table

FLUX2_WAN_LAYOUTS = ("kohya", "aitk", "comfy", "peft_raw")

#: PEFT target_modules of the built-in FLUX.2 and Wan diffusers-layout LoRAs: every attention and
#: feed-forward Linear (a regular expression for FLUX.2, where ``attn.to_out`` is a Linear only in single
#: blocks).
FLUX2_WAN_PEFT_TARGETS: dict[str, str | tuple[str, ...]] = {
    "flux2": r".*\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out|linear_in|linear_out|to_qkv_mlp_proj)$"
    r"|.*single_transformer_blocks\.\d+\.attn\.to_out$",
    "wan": ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"),
}


def default_selection(family: str, layout: str) -> Callable[[str], bool]:
    """Which modules a built-in LoRA of this family and layout adapts (original names; diffusers names
    for ``peft_raw``): kohya files reach every Linear the table names (embedders, shared modulation,
    final layer), the others the blocks' attention and feed-forward layers, as trainers default to."""
    if layout == "kohya":
        return lambda name: True
    if layout == "peft_raw":
        return lambda name: "attn." in name or ".ff" in name
    blocks = ("double_blocks.", "single_blocks.") if family == "flux2" else ("blocks.",)
    return lambda name: name.startswith(blocks)


def original_modules(
    family: Family, transformer: torch.nn.Module
) -> Iterator[tuple[str, tuple[str, ...], int, int]]:
    """(original name, diffusers modules, in_features, out_features) of every Linear rule of the family's
    table the transformer has, in table order then block order (fused modules: heights summed)."""
    for name, names, parts in rule_modules(transformer, family.original_modules):
        if all(isinstance(p, torch.nn.Linear) for p in parts):
            yield name, names, parts[0].in_features, sum(p.out_features for p in parts)


def _diffusers_linears(transformer: torch.nn.Module) -> Iterator[tuple[str, tuple[str, ...], int, int]]:
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            yield name, (name,), module.in_features, module.out_features


def make_original_lora(
    family: Family,
    pipe: Any,
    path: Path,
    *,
    layout: str,
    rank: int,
    alpha: float,
    seed: int,
    select: Callable[[str], bool],
    scale: float = 0.2,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Pipeline + layout (see the module docstring) + rank/alpha/seed -> ``path``. ``select(original
    name)`` picks the modules; ``alpha`` is written by the layouts that have one."""
    if layout not in FLUX2_WAN_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {FLUX2_WAN_LAYOUTS}")
    path = Path(path)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    raw = layout == "peft_raw"
    found = _diffusers_linears(pipe.transformer) if raw else original_modules(family, pipe.transformer)
    for name, _, inp, out in found:
        if not select(name):
            continue
        down, up = random_factors(generator, rank, inp, out, scale, dtype)
        if raw:
            stem, roles = f"base_model.model.{name}", ("lora_A", "lora_B")
        elif layout == "kohya":
            stem, roles = "lora_unet_" + name.replace(".", "_"), ("lora_down", "lora_up")
        else:
            stem = f"diffusion_model.{name}"
            roles = ("lora_A", "lora_B") if layout == "aitk" else ("lora_down", "lora_up")
        tensors[f"{stem}.{roles[0]}.weight"] = down
        tensors[f"{stem}.{roles[1]}.weight"] = up
        if layout in ("kohya", "comfy"):
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    metadata = {
        "kohya": {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)},
        "aitk": {"software": '{"name": "ai-toolkit"}'},
        "comfy": {},
        "peft_raw": {},
    }[layout]
    return save_lora_file(tensors, path, metadata)
