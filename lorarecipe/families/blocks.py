"""Per-block LoRA weights on a transformer denoiser: the recipe syntax, its checks, and each module's weight.

diffusers scales blocks only on UNets (every DiT gets the identity in ``_SET_ADAPTER_SCALE_FN_MAPPING``),
so lorarecipe defines the DiT form itself, with the block names of the family's ``block_groups``::

    transformer: {double_blocks: {0-9: 0.5, 12: 0.8}, single_blocks: 1.0, default: 1.0}

A group takes one weight, or a mapping of block index / inclusive range ``lo-hi`` -> weight. Blocks
no entry names, and modules outside every block (embedders, final layer), take ``default`` (1.0 when
absent). A module's weight multiplies its LoRA delta exactly as a scalar adapter weight would:
PEFT scaling = weight × alpha / r (× ``lora_scale`` when fused). Spec -> :class:`BlockWeights`
(:func:`parse_block_weights`, reporting every problem with its place in the spec), checked against
the model's block counts (:func:`check_block_counts`), then :func:`module_weight`. Torch-free.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..diagnostics import did_you_mean
from .original_names import block_of
from .spec import Family

__all__ = [
    "DEFAULT_KEY",
    "BlockProblem",
    "BlockWeights",
    "block_counts_from_config",
    "block_counts_from_keys",
    "canonical_block_spec",
    "check_block_counts",
    "is_block_spec",
    "module_weight",
    "parse_block_weights",
]

DEFAULT_KEY = "default"
_RANGE = re.compile(r"^(\d{1,4})(?:-(\d{1,4}))?$")

Range = tuple[int, int, float, Any]  # (first block, last block, weight, the key as written)


@dataclass(frozen=True)
class BlockProblem:
    """A problem in a per-block spec: ``path`` inside the transformer mapping (group, range key)."""

    path: tuple[Any, ...]  # keys as written (a range key may be an int)
    message: str
    hint: str | None = None
    on_key: bool = True


@dataclass(frozen=True)
class BlockWeights:
    """A parsed spec: the default, and per group one weight or inclusive ranges (lo, hi, weight, key as
    written)."""

    default: float
    groups: tuple[tuple[str, float | tuple[Range, ...]], ...]

    def group(self, name: str) -> float | tuple[Range, ...] | None:
        return dict(self.groups).get(name)


def is_block_spec(value: Any) -> bool:
    """Whether a component weight is a per-block mapping (not a number)."""
    return isinstance(value, Mapping)


def _range(key: Any) -> tuple[int, int] | None:
    found = _RANGE.match(str(key)) if not isinstance(key, bool) else None
    if found is None:
        return None
    low = int(found.group(1))
    return low, int(found.group(2) or low)


def _unknown_group(family: Family, name: str) -> BlockProblem:
    names = [g.name for g in family.block_groups]
    by_prefix = {g.module_prefix: g.name for g in family.block_groups}
    if name in by_prefix:
        hint = f"write {by_prefix[name]!r} (diffusers calls it {name!r})"
    else:
        hint = did_you_mean(name, [*names, DEFAULT_KEY]) or f"groups: {', '.join(names)}, or {DEFAULT_KEY!r}"
    return BlockProblem((name,), f"{family.label} has no block group {name!r}", hint)


def _ranges(group: str, table: Mapping[Any, Any], problems: list[BlockProblem]) -> tuple[Range, ...]:
    found: list[Range] = []
    for key, weight in table.items():
        span = _range(key)
        if span is None:
            problems.append(
                BlockProblem(
                    (group, key), f"{key!r} is not a block index or range", "write 3, or 0-9 (inclusive)"
                )
            )
        elif span[0] > span[1]:
            problems.append(
                BlockProblem(
                    (group, key), f"range {key!r} ends before it starts", f"write {span[1]}-{span[0]}"
                )
            )
        else:
            found.append((span[0], span[1], float(weight), key))
    found.sort(key=lambda r: (r[0], r[1]))
    widest: Range | None = None  # the range reaching furthest so far
    for current in found:
        if widest is not None and current[0] <= widest[1]:
            problems.append(
                BlockProblem(
                    (group, current[3]),
                    f"blocks {current[3]} overlap {widest[3]} in {group}",
                    "give each block one weight",
                )
            )
        if widest is None or current[1] > widest[1]:
            widest = current
    return tuple(found)


def parse_block_weights(
    family: Family, spec: Mapping[Any, Any]
) -> tuple[BlockWeights | None, list[BlockProblem]]:
    """A per-block spec (as written, or as :func:`canonical_block_spec` left it) -> BlockWeights, and
    every problem found (None when there is any)."""
    problems: list[BlockProblem] = []
    if not family.block_groups:
        return None, [
            BlockProblem((), f"{family.label} has no per-block weights on its {family.denoiser}", None, False)
        ]
    known = {g.name for g in family.block_groups}
    groups: list[tuple[str, float | tuple[Range, ...]]] = []
    default = 1.0
    for name, value in spec.items():
        name = str(name)
        if name == DEFAULT_KEY:
            if isinstance(value, Mapping):
                problems.append(
                    BlockProblem((name,), "'default' takes one weight, not a mapping", None, False)
                )
            else:
                default = float(value)
        elif name not in known:
            problems.append(_unknown_group(family, name))
        elif isinstance(value, Mapping):
            groups.append((name, _ranges(name, value, problems)))
        else:
            groups.append((name, float(value)))
    return (None if problems else BlockWeights(default, tuple(groups))), problems


def check_block_counts(weights: BlockWeights, counts: Mapping[str, int]) -> list[BlockProblem]:
    """Ranges that name blocks the model does not have (``counts``: group -> number of blocks)."""
    problems: list[BlockProblem] = []
    for name, value in weights.groups:
        if isinstance(value, float) or name not in counts:
            continue
        count = counts[name]
        for _, high, _, key in value:
            if high >= count:
                last = f"0-{count - 1}" if count else "none"
                problems.append(
                    BlockProblem(
                        (name, key), f"block {high} is out of range: the model has {count} {name} ({last})"
                    )
                )
    return problems


def module_weight(family: Family, weights: BlockWeights, module: str) -> float:
    """The weight of one denoiser module (diffusers name): its block's, else the default."""
    place = block_of(family, module)
    if place is None:
        return weights.default
    group = weights.group(place[0].name)
    if group is None:
        return weights.default
    if isinstance(group, float):
        return group
    index = place[1]
    for low, high, weight, _ in group:
        if low <= index <= high:
            return weight
    return weights.default


def canonical_block_spec(weights: BlockWeights) -> dict[str, Any]:
    """BlockWeights -> the plan's canonical mapping (string range keys in block order, default last)."""
    out: dict[str, Any] = {}
    for name, value in weights.groups:
        if isinstance(value, float):
            out[name] = value
        else:
            out[name] = {(f"{lo}" if lo == hi else f"{lo}-{hi}"): w for lo, hi, w, _ in value}
    out[DEFAULT_KEY] = weights.default
    return out


def block_counts_from_keys(family: Family, keys: Iterable[str]) -> dict[str, int]:
    """Denoiser state-dict keys, diffusers (``transformer_blocks.3.…``) or original names
    (``double_blocks.3.…``) -> {group: number of blocks} (highest index + 1)."""
    counts = {g.name: 0 for g in family.block_groups}
    for key in keys:
        place = block_of(family, key)
        for group in family.block_groups if place is None else ():
            index = key[len(group.name) + 1 :].split(".", 1)[0] if key.startswith(group.name + ".") else ""
            place = (group, int(index)) if index.isdigit() else None
            if place is not None:
                break
        if place is not None:
            counts[place[0].name] = max(counts[place[0].name], place[1] + 1)
    return counts


def block_counts_from_config(family: Family, config: Mapping[str, Any]) -> dict[str, int]:
    """The denoiser's config.json -> {group: number of blocks}, for the groups it states."""
    return {
        g.name: int(config[g.config_key])
        for g in family.block_groups
        if isinstance(config.get(g.config_key), int)
    }
