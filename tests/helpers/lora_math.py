"""An independent reading of LoRA files: the delta each one adds to each base weight.

This deliberately shares no code with lorarecipe or diffusers' converters: keys are parsed with
regular expressions here, alpha comes from the file (kohya ``.alpha`` tensors, PEFT
``lora_adapter_metadata``, or alpha = rank for the old layouts), and
``delta = alpha / rank · up @ down`` is computed in float64.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorarecipe.outputs.safetensors_meta import read_metadata

_PEFT = re.compile(r"^(unet|text_encoder|text_encoder_2|transformer)\.(.+)\.lora_(A|B)\.weight$")
_OLD = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora\.(down|up)\.weight$")
_PROCS = re.compile(r"^(?:unet\.)?(.+)\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$")
_KOHYA = re.compile(
    r"^(lora_unet|lora_te|lora_te1|lora_te2)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$"
)
_KOHYA_COMPONENT = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}


def read_component_weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    """All tensors of one component of a diffusers folder (any *.safetensors file in it)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted((folder / component).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def _base_key(component_keys: Iterable[str], module: str, flat: bool) -> str | None:
    keys = set(component_keys)
    if flat:
        table = {}
        for key in keys:
            if key.endswith(".weight"):
                name = key[: -len(".weight")]
                table[name.replace(".", "_")] = key
                if name.startswith("text_model."):
                    table[name[len("text_model.") :].replace(".", "_")] = key
                else:
                    table["text_model_" + name.replace(".", "_")] = key
        return table.get(module)
    for candidate in (
        f"{module}.weight",
        f"text_model.{module}.weight",
        f"{module.removeprefix('text_model.')}.weight",
    ):
        if candidate in keys:
            return candidate
    return None


@dataclass(frozen=True)
class LoraFactors:
    """One module of a LoRA file as stored: ``down`` (A) ``[r, in]`` or ``[r, in, 1, 1]``, ``up`` (B)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    rank: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """alpha / rank · up @ down in float64, shaped like the base weight."""
        return (self.scale * (self.up.double().flatten(1) @ self.down.double().flatten(1))).reshape(shape)


def lora_factors(
    path: Path, base: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[tuple[str, str], LoraFactors]:
    """(component, base weight key) -> the file's factors and alpha, for the components in ``base``."""
    tensors = load_file(str(path))
    meta = read_metadata(path)
    peft_meta = json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else {}
    parts: dict[tuple[str, str, bool], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if m := _PEFT.match(key):
            parts.setdefault((m[1], m[2], False), {})["down" if m[3] == "A" else "up"] = tensor
        elif m := _OLD.match(key):
            parts.setdefault((m[1], m[2], False), {})[m[3]] = tensor
        elif m := _PROCS.match(key):
            proj = "to_out.0" if m[2] == "to_out" else m[2]
            parts.setdefault(("unet", f"{m[1]}.{proj}", False), {})[m[3]] = tensor
        elif m := _KOHYA.match(key):
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m[3]]
            parts.setdefault((_KOHYA_COMPONENT[m[1]], m[2], True), {})[role] = tensor
        else:
            raise AssertionError(f"unexpected key {key}")
    factors: dict[tuple[str, str], LoraFactors] = {}
    for (component, module, flat), p in parts.items():
        if component not in base:
            continue  # the caller only checks some components
        rank = p["down"].shape[0]
        if "alpha" in p:
            alpha = float(p["alpha"])
        elif peft_meta:
            alpha = float(
                peft_meta.get(f"{component}.alpha_pattern", {}).get(
                    module, peft_meta[f"{component}.lora_alpha"]
                )
            )
            rank = int(peft_meta.get(f"{component}.rank_pattern", {}).get(module, rank))
        else:
            alpha = float(rank)
        key = _base_key(base[component].keys(), module, flat)
        assert key is not None, f"{path.name}: no base weight for {component}.{module}"
        factors[(component, key)] = LoraFactors(p["down"], p["up"], alpha, rank)
    return factors


def lora_deltas(
    path: Path, base: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[tuple[str, str], torch.Tensor]:
    """(component, base weight key) -> float64 delta of one LoRA file at weight 1."""
    return {key: f.delta(base[key[0]][key[1]].shape) for key, f in lora_factors(path, base).items()}


def expected_fused(
    base: Mapping[str, Mapping[str, torch.Tensor]], loras: Iterable[tuple[Path, float]], lora_scale: float
) -> dict[tuple[str, str], torch.Tensor]:
    """W + lora_scale · Σ wᵢ · (αᵢ/rᵢ) · BᵢAᵢ for every weight some LoRA touches (float64)."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    for path, weight in loras:
        for key, delta in lora_deltas(path, base).items():
            out[key] = out.get(key, torch.zeros_like(delta)) + weight * delta
    return {key: base[key[0]][key[1]].double() + lora_scale * total for key, total in out.items()}


def tensor_keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())
