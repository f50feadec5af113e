"""Random, seeded LoRA files for the DiT built-ins (Qwen-Image, Z-Image, SD 3) in the layouts trainers write.

Input: a pipeline (module names and shapes only), a family, a layout, rank/alpha/seed. Output: one
``.safetensors`` file, byte-identical for equal inputs. Layouts:

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..families import FAMILIES, Family
from ..families.original_names import original_place
from .loras import canonicalize_safetensors, make_peft_lora

__all__ = ["DIT_PEFT_TARGETS", "make_dit_lora"]

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
_TE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
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


def _pair(
    generator: torch.Generator,
    rank: int,
    inp: int,
    out: int,
    scale: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    return (
        (torch.randn((rank, inp), generator=generator) * scale).to(dtype),
        (torch.randn((out, rank), generator=generator) * scale).to(dtype),
    )


def _kohya(key: str, down: Any, up: Any, alpha: float) -> dict[str, Any]:
    return {
        f"{key}.lora_down.weight": down,
        f"{key}.lora_up.weight": up,
        f"{key}.alpha": torch.tensor(float(alpha)),
    }


def _keyed(layout: str, name: str, down: Any, up: Any, alpha: float) -> dict[str, Any]:
    """One transformer module's factors under the layout's key names."""
    if layout in ("kohya", "comfy"):
        return _kohya("lora_unet_" + name.replace(".", "_"), down, up, alpha)
    if layout == "bare":
        return _kohya(name, down, up, alpha)
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
            down, up = _pair(generator, rank, inp, sum(heights), scale, dtype)
            tensors.update(_keyed(layout, name, down, up, alpha))
    else:
        for name, module in _linears(pipe.transformer):
            if wanted(name):
                down, up = _pair(generator, rank, module.in_features, module.out_features, scale, dtype)
                tensors.update(_keyed(layout, name, down, up, alpha))
    if layout == "kohya" and text_encoders:  # CLIPs as kohya names them: one 'text_model_' segment
        for component, prefix in info.kohya_prefixes.items():
            model = getattr(pipe, component) if component != info.denoiser else None
            for name, module in _linears(model) if model is not None else ():
                if name.rsplit(".", 1)[-1] in _TE_SUFFIXES:
                    flat = ("text_model." + name.removeprefix("text_model.")).replace(".", "_")
                    down, up = _pair(generator, rank, module.in_features, module.out_features, scale)
                    tensors.update(_kohya(f"{prefix}_{flat}", down, up, alpha))
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata if layout in ("kohya", "comfy") else {})
    canonicalize_safetensors(path)
    return path
