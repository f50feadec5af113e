"""diffusers' per-block UNet weights, resolved per module without diffusers (torch-free).

A UNet weight dict as ``set_adapters`` takes it (``{down: 0.9, mid: 1.0, up: {block_1: [0.6, 1.0]}}``)
+ the UNet's weight keys -> the weight of any UNet module. For LoRAs diffusers does this itself on
the PEFT layers; lorarecipe applies LyCORIS/DoRA adapters itself and gives their modules the weight
diffusers would give a LoRA layer on the same module. The rules are diffusers 0.42.1's, step for step:
``_maybe_expand_lora_scales_for_one_adapter`` (``loaders/unet_loader_utils.py``) expands the dict over
the blocks that have attentions (``layers_per_block`` of them per down block, one more per up block,
unnamed ones at 1.0), and ``get_module_weight`` (``utils/peft_utils.py``) gives a module the weight of
the first expanded name it contains, else that of the attention with its block and layer index
(so a down block's resnet ``i`` takes its attention ``i``'s weight), else 1.0. Where diffusers would
fail on a module outside the down/mid/up blocks (``conv_in``, ``time_embedding``: an IndexError on the
module name), lorarecipe gives it 1.0, as modules outside blocks get on a DiT.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["expand_unet_weights", "unet_module_weight"]


def _blocks_with_attentions(keys: Iterable[str]) -> tuple[dict[str, list[int]], int]:
    """UNet keys -> ({"down": [blocks with attentions], "up": [...]}, layers_per_block)."""
    blocks: dict[str, set[int]] = {"down": set(), "up": set()}
    resnets: set[int] = set()
    for key in keys:
        parts = key.split(".")
        if len(parts) > 3 and parts[0] in ("down_blocks", "up_blocks") and parts[1].isdigit():
            if parts[2] == "attentions":
                blocks[parts[0].removesuffix("_blocks")].add(int(parts[1]))
            if parts[:3] == ["down_blocks", "0", "resnets"] and parts[3].isdigit():
                resnets.add(int(parts[3]))
    return {k: sorted(v) for k, v in blocks.items()}, (max(resnets) + 1 if resnets else 2)


def _layer(name: str) -> str:
    """'down.block_1.0' -> 'down_blocks.1.attentions.0'; 'mid' -> 'mid_block.attentions.0'."""
    if name == "mid":
        return "mid_block.attentions.0"
    updown, block, attention = name.split(".")
    return f"{updown}_blocks.{block.removeprefix('block_')}.attentions.{attention}"


def expand_unet_weights(spec: Mapping[str, Any], unet_keys: Iterable[str]) -> dict[str, float]:
    """A UNet weight dict -> {'down_blocks.1.attentions.0': weight, ...} as diffusers expands it;
    ValueError naming the block when the dict does not fit this UNet (as diffusers raises)."""
    keys = list(unet_keys)
    with_attention, layers = _blocks_with_attentions(keys)
    per_block = {"down": layers, "up": layers + 1}
    scales: dict[str, Any] = dict(spec)
    mid = scales.get("mid", 1.0)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise ValueError(f"expected 1 weight for mid, got {len(mid)}")
        mid = mid[0]
    expanded: dict[str, float] = {"mid": float(mid)}
    for updown in ("up", "down"):
        value = scales.get(updown, 1.0)
        table = value if isinstance(value, Mapping) else {f"block_{i}": value for i in with_attention[updown]}
        for i in with_attention[updown]:
            weights = table.get(f"block_{i}", 1.0)
            if not isinstance(weights, list):
                weights = [weights] * per_block[updown]
            elif len(weights) == 1:
                weights = weights * per_block[updown]
            elif len(weights) != per_block[updown]:
                raise ValueError(
                    f"expected {per_block[updown]} weights for {updown}.block_{i}, got {len(weights)}"
                )
            for index, weight in enumerate(weights):
                expanded[f"{updown}.block_{i}.{index}"] = float(weight)
    for name in expanded:
        if not any(_layer(name) in key for key in keys):
            raise ValueError(f"no attention layer {name} in this UNet (or its block has no attentions)")
    return {_layer(name): weight for name, weight in expanded.items()}


def unet_module_weight(expanded: Mapping[str, float], module: str) -> float:
    """The weight of one UNet module under an expanded dict (diffusers' ``get_module_weight``)."""
    for layer, weight in expanded.items():
        if layer in module:
            return weight
    parts = module.split(".")
    if len(parts) < 4:
        return 1.0
    return expanded.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0)
