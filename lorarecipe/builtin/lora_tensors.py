"""The pieces every built-in LoRA writer shares (``loras``, ``flux_loras``, ``dit_loras``).

Input: a transformer and a family table's module rules, a seeded generator, shapes, rank/alpha. Output:
the modules the rules name, random factors, kohya-keyed tensors, one canonical ``.safetensors`` file.
Random values are drawn in call order from the caller's generator (down before up), so a writer's
files are byte-identical for equal inputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..families import ModuleRule
from ..outputs.safetensors_meta import canonicalize_header

__all__ = ["kohya_tensors", "random_factors", "rule_modules", "save_lora_file", "text_encoder_kohya_tensors"]

#: text-encoder Linears the kohya layouts adapt (attention q/k/v/out, MLP fc1/fc2)
_TE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def rule_modules(
    transformer: torch.nn.Module, rules: Sequence[ModuleRule]
) -> Iterator[tuple[str, tuple[str, ...], list[Any]]]:
    """(original name, diffusers module names, the modules) of every rule the transformer has, in table
    order then block order (a ``{i}`` rule until the first block index it lacks)."""
    modules = dict(transformer.named_modules())
    for rule in rules:
        for index in range(10_000) if "{i}" in rule.original else (None,):
            names = tuple(d.replace("{i}", str(index)) for d in rule.diffusers)
            if not all(n in modules for n in names):
                break
            name = rule.original if index is None else rule.original.replace("{i}", str(index))
            yield name, names, [modules[n] for n in names]


def random_factors(
    generator: torch.Generator,
    rank: int,
    inp: int,
    out: int,
    scale: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down ``[rank, inp]``, up ``[out, rank]``) = ``randn * scale`` in ``dtype``, down drawn first."""
    return (
        (torch.randn((rank, inp), generator=generator) * scale).to(dtype),
        (torch.randn((out, rank), generator=generator) * scale).to(dtype),
    )


def kohya_tensors(key: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """One module's factors under kohya keys: ``key.lora_down.weight``, ``.lora_up.weight`` and a 0-dim
    float32 ``.alpha``."""
    return {
        f"{key}.lora_down.weight": down,
        f"{key}.lora_up.weight": up,
        f"{key}.alpha": torch.tensor(float(alpha), dtype=torch.float32),
    }


def text_encoder_kohya_tensors(
    model: torch.nn.Module, prefix: str, generator: torch.Generator, *, rank: int, alpha: float, scale: float
) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's attention and MLP Linears as kohya names them (``{prefix}_text_model_…``,
    one ``text_model`` segment whether the model has that module or not), float32 factors."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in _TE_SUFFIXES:
            flat = ("text_model." + name.removeprefix("text_model.")).replace(".", "_")
            down, up = random_factors(generator, rank, module.in_features, module.out_features, scale)
            tensors.update(kohya_tensors(f"{prefix}_{flat}", down, up, alpha))
    return tensors


def save_lora_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Tensors + header metadata -> ``path`` (parents created), with the canonical header bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    canonicalize_header(path)
    return path
