"""Write random, seeded LoRA files for the FLUX.2 and Wan built-ins, in the layouts found in the wild.

Input: a pipeline (only its transformer's module names and shapes are read), a family with an
original-layout table, a layout, rank/alpha/seed. Output: one ``.safetensors`` file, byte-identical
for equal inputs. Module names come from the family table (``ModuleRule``): a fused original module is
as tall as its diffusers parts summed (FLUX.2's ``qkv``).

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
from safetensors.torch import save_file

from ..families import Family
from .loras import canonicalize_safetensors

__all__ = ["DIT_LAYOUTS", "PEFT_TARGETS", "default_selection", "make_original_lora", "original_modules"]

DIT_LAYOUTS = ("kohya", "aitk", "comfy", "peft_raw")

#: PEFT target_modules of the built-in diffusers-layout LoRAs: every attention and feed-forward Linear
#: (a regular expression for FLUX.2, where ``attn.to_out`` is a Linear only in single blocks).
PEFT_TARGETS: dict[str, str | tuple[str, ...]] = {
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
    modules = dict(transformer.named_modules())
    for rule in family.original_modules:
        for index in range(10_000) if "{i}" in rule.original else (None,):
            names = tuple(d.replace("{i}", str(index)) for d in rule.diffusers)
            if not all(n in modules for n in names):
                break
            parts: list[Any] = [modules[n] for n in names]
            if all(isinstance(p, torch.nn.Linear) for p in parts):
                name = rule.original if index is None else rule.original.replace("{i}", str(index))
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
    if layout not in DIT_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {DIT_LAYOUTS}")
    path = Path(path)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    raw = layout == "peft_raw"
    found = _diffusers_linears(pipe.transformer) if raw else original_modules(family, pipe.transformer)
    for name, _, inp, out in found:
        if not select(name):
            continue
        down = (torch.randn((rank, inp), generator=generator) * scale).to(dtype)
        up = (torch.randn((out, rank), generator=generator) * scale).to(dtype)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    canonicalize_safetensors(path)
    return path
