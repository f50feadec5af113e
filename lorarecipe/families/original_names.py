"""A family's original-layout names <-> diffusers names, from its :class:`ModuleRule` tables (torch-free).

Module name in a LoRA file (BFL dotted ``double_blocks.0.img_attn.qkv``, kohya flattened
``double_blocks_0_img_attn_qkv``, XLabs ``double_blocks.0.processor.qkv_lora1``) -> the diffusers
modules it adapts and how its rows split (:func:`match_lora_module`, :func:`split_heights`);
diffusers state-dict key -> its original key and place in a fused tensor (:func:`original_place`,
for single-file checkpoints); diffusers module -> its block (:func:`block_of`). Pure string work.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

from .spec import BlockGroup, Family, ModuleRule, Split

__all__ = [
    "ModuleMatch",
    "OriginalPlace",
    "block_of",
    "blocks_touched",
    "halves_swapped",
    "lora_targets",
    "match_lora_module",
    "original_place",
    "split_heights",
]


@dataclass(frozen=True)
class ModuleMatch:
    """A LoRA module in the original layout: its original name and the diffusers modules it holds."""

    original: str
    diffusers: tuple[str, ...]
    split: Split


@dataclass(frozen=True)
class OriginalPlace:
    """Where a diffusers tensor is stored in the original layout: ``key``, rows part ``part`` of
    ``parts`` (concatenated along dim 0 in rule order), and the rule's split."""

    key: str
    part: int
    parts: int
    split: Split


def _template_regex(template: str, separators: str) -> str:
    """'double_blocks.{i}.img_attn.qkv' -> a regex with the block index as group ``i``."""
    pieces = [re.escape(p) for p in template.split("{i}")]
    pattern = r"(?P<i>\d+)".join(pieces)
    return pattern.replace(r"\.", separators)


@cache
def _lora_patterns(family: Family) -> tuple[tuple[re.Pattern[str], ModuleRule], ...]:
    rules = (*family.original_modules, *family.lora_only_modules)
    return tuple((re.compile("^" + _template_regex(r.original, "[._]") + "$"), r) for r in rules)


def match_lora_module(family: Family, name: str) -> ModuleMatch | None:
    """A LoRA module name (dotted or kohya-flattened, component prefix removed) in the family's
    original layout -> its diffusers modules; None when the name is not an original-layout name."""
    for pattern, rule in _lora_patterns(family):
        found = pattern.match(name)
        if found is not None:
            index = found.groupdict().get("i") or ""
            return ModuleMatch(
                rule.original.replace("{i}", index),
                tuple(d.replace("{i}", index) for d in rule.diffusers),
                rule.split,
            )
    return None


def split_heights(split: Split, parts: int, in_features: int, out_features: int) -> tuple[int, ...] | None:
    """Row heights of each diffusers part of an original weight ``out_features × in_features``;
    None when the shape cannot be split that way."""
    if split is Split.EQUAL:
        return (out_features // parts,) * parts if out_features % parts == 0 else None
    if split is Split.QKV_REST:  # q, k, v are as tall as the hidden width (= linear1's input)
        rest = out_features - 3 * in_features
        return (in_features,) * 3 + (rest,) if parts == 4 and rest > 0 else None
    if split in (Split.SWAP_HALVES, Split.SWAP_HALVES_IF_PAIR):
        return (out_features,) if out_features % 2 == 0 or split is Split.SWAP_HALVES_IF_PAIR else None
    return (out_features,)


def halves_swapped(split: Split, in_features: int, out_features: int) -> bool:
    """Whether a module's two row halves are stored swapped: always for SWAP_HALVES, and for
    SWAP_HALVES_IF_PAIR when the weight is twice as tall as wide (an AdaLayerNormContinuous)."""
    if split is Split.SWAP_HALVES_IF_PAIR:
        return out_features == 2 * in_features
    return split is Split.SWAP_HALVES


@cache
def _diffusers_patterns(family: Family) -> tuple[tuple[re.Pattern[str], str, int, int, Split], ...]:
    """(regex over a diffusers state-dict key, original key template, part, parts, split)."""
    out: list[tuple[re.Pattern[str], str, int, int, Split]] = []
    for rule in family.original_modules:
        for part, module in enumerate(rule.diffusers):
            regex = _template_regex(module, r"\.") + r"\.(?P<param>weight|bias)"
            out.append(
                (
                    re.compile("^" + regex + "$"),
                    rule.original + ".{param}",
                    part,
                    len(rule.diffusers),
                    rule.split,
                )
            )
    for param in family.original_params:
        out.append(
            (
                re.compile("^" + _template_regex(param.diffusers, r"\.") + "$"),
                param.original,
                0,
                1,
                Split.WHOLE,
            )
        )
    return tuple(out)


def original_place(family: Family, key: str) -> OriginalPlace | None:
    """A diffusers state-dict key of the family's denoiser -> where the original layout stores it
    (its own name when no rule names it and the family keeps names, else None)."""
    for pattern, template, part, parts, split in _diffusers_patterns(family):
        found = pattern.match(key)
        if found is not None:
            groups = found.groupdict()
            original = template.replace("{i}", groups.get("i") or "").replace(
                "{param}", groups.get("param") or ""
            )
            return OriginalPlace(original, part, parts, split)
    return OriginalPlace(key, 0, 1, Split.WHOLE) if family.original_keeps_names else None


def lora_targets(family: Family, name: str) -> tuple[tuple[str, ...], bool]:
    """A denoiser module name from a LoRA file -> (the diffusers modules it adapts, whether it is a fused
    original-layout module that is split among them)."""
    found = match_lora_module(family, name)
    if found is None:
        return (name.removeprefix("diffusion_model."),), False
    return found.diffusers, len(found.diffusers) > 1


def block_of(family: Family, module: str) -> tuple[BlockGroup, int] | None:
    """A diffusers module name of the denoiser (dotted, or kohya-flattened) -> (its block group, block
    index), or None outside blocks."""
    for group in family.block_groups:
        for separator in ".", "_":
            prefix = group.module_prefix + separator
            if module.startswith(prefix):
                index = re.split(r"[._]", module[len(prefix) :], maxsplit=1)[0]
                if index.isdigit():
                    return group, int(index)
    return None


def _runs(indexes: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    ordered = sorted(set(indexes))
    runs: list[str] = []
    start = prev = ordered[0]
    for value in [*ordered[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ", ".join(runs)


def blocks_touched(family: Family, modules: Iterable[str]) -> str:
    """Diffusers module names -> 'double_blocks 0-18, single_blocks 0-37, outside blocks: 2 modules'."""
    found: dict[str, set[int]] = {}
    outside = 0
    for module in modules:
        place = block_of(family, module)
        if place is None:
            outside += 1
        else:
            found.setdefault(place[0].name, set()).add(place[1])
    parts = [f"{g.name} {_runs(found[g.name])}" for g in family.block_groups if g.name in found]
    if outside:
        parts.append(f"{outside} module{'s' if outside != 1 else ''} outside blocks")
    return ", ".join(parts) or "no modules"
