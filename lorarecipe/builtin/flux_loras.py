"""Write random, seeded FLUX.1 LoRA files in the original-layout formats found in the wild.

Input: a FLUX.1 pipeline (only module names and shapes are read), a layout, rank/alpha/seed.
Output: one ``.safetensors`` file, byte-identical for equal inputs. Module names come from the
family table (:data:`lorarecipe.families.flux1.ORIGINAL_MODULES`): a BFL module's weight is as
wide as its diffusers modules' and as tall as their heights summed (fused ``qkv``, ``linear1``).

- ``kohya`` (sd-scripts, ComfyUI): ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` for every block module and the final layer, plus the CLIP text
  encoder as ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj…``;
- ``aitk`` (ai-toolkit): ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` / ``lora_B``
  for attention and MLP modules, no alpha;
- ``xlabs`` (XLabs-AI): ``double_blocks.0.processor.qkv_lora1.down.weight`` / ``.up.weight``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..families import FAMILIES, ModuleRule
from ..families.flux1 import ORIGINAL_MODULES, XLABS_MODULES
from .lora_tensors import (
    kohya_tensors,
    random_factors,
    rule_modules,
    save_lora_file,
    text_encoder_kohya_tensors,
)

__all__ = ["FLUX_PEFT_TARGETS", "bfl_modules", "make_flux_lora"]

#: PEFT target_modules of the built-in PEFT-layout FLUX.1 LoRAs: every attention and MLP Linear.
FLUX_PEFT_TARGETS = (
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
    "proj_mlp",
    "proj_out",
)
_AITK = (
    "img_attn.qkv",
    "img_attn.proj",
    "img_mlp.",
    "txt_attn.qkv",
    "txt_attn.proj",
    "txt_mlp.",
    "linear1",
    "linear2",
)


def bfl_modules(
    transformer: torch.nn.Module, rules: tuple[ModuleRule, ...]
) -> Iterator[tuple[str, int, int]]:
    """(original module name, in_features, out_features) of every rule the transformer has, in table
    order then block order; the out features of a fused module are its parts' summed."""
    for name, _, parts in rule_modules(transformer, rules):
        yield name, parts[0].in_features, sum(p.out_features for p in parts)


def _wanted(layout: str, name: str) -> bool:
    if layout == "aitk":
        return any(piece in name for piece in _AITK)
    return name.startswith(("double_blocks.", "single_blocks.", "final_layer."))


def make_flux_lora(
    pipe: Any,
    path: Path,
    *,
    layout: str,
    rank: int,
    alpha: float,
    seed: int,
    text_encoders: bool = True,
    scale: float = 0.2,
    select: Callable[[str], bool] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """FLUX.1 pipeline + layout ('kohya' | 'aitk' | 'xlabs') + rank/alpha/seed -> ``path`` (see the
    module docstring). ``alpha`` is written only by the kohya layout (the others have none).
    ``select``: which original modules to adapt (default: the layout's usual set); ``dtype``: of the
    factors."""
    path = Path(path)
    generator = torch.Generator().manual_seed(seed)
    if layout == "xlabs":  # XLabs files adapt the double blocks' attention only
        rules = tuple(r for r in XLABS_MODULES if r.original.startswith("double_blocks."))
    else:
        rules = ORIGINAL_MODULES
    tensors: dict[str, torch.Tensor] = {}
    for name, inp, out in bfl_modules(pipe.transformer, rules):
        if not (select(name) if select is not None else _wanted(layout, name)):
            continue
        down, up = random_factors(generator, rank, inp, out, scale, dtype)
        if layout == "kohya":
            tensors.update(kohya_tensors("lora_unet_" + name.replace(".", "_"), down, up, alpha))
        elif layout == "aitk":
            tensors.update(
                {f"diffusion_model.{name}.lora_A.weight": down, f"diffusion_model.{name}.lora_B.weight": up}
            )
        else:
            tensors.update({f"{name}.down.weight": down, f"{name}.up.weight": up})
    if layout == "kohya" and text_encoders:
        prefix = FAMILIES["flux"].kohya_prefixes["text_encoder"]
        tensors.update(
            text_encoder_kohya_tensors(
                pipe.text_encoder, prefix, generator, rank=rank, alpha=alpha, scale=scale
            )
        )
    metadata = {
        "kohya": {
            "ss_network_module": "networks.lora_flux",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha),
        },
        "aitk": {"software": '{"name": "ai-toolkit"}'},
        "xlabs": {},
    }[layout]
    return save_lora_file(tensors, path, metadata)
