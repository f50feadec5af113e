"""(LoraInfo, BaseInfo) -> :class:`CompatReport`: does each LoRA module find a base weight of the
right shape? Names and shapes only, so ``validate`` can catch a wrong-family LoRA in milliseconds.

Diffusers-style names map to ``<module>.weight``; kohya's flattened names are looked up in an
index of the base keys with dots replaced by underscores; names in a family's original layout
(FLUX.1's BFL ``double_blocks.0.img_attn.qkv``, kohya- or XLabs-named) map through the family's
module table onto the diffusers modules they hold, each part checked for its shape. A component
the family does not load LoRAs into (FLUX.1's T5) is reported, not skipped. When a component's
names cannot be mapped at all (e.g. SGM-named kohya on a diffusers folder) the report says so
instead of calling every module missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..families import Family, Variant, family_label, get_family
from ..families.original_names import match_lora_module, original_place, split_heights
from .base_model import BaseInfo
from .lora_family import lora_variant, variant_of_widths
from .lora_keys import COMPONENT_ORDER, LoraInfo, LoraModule

__all__ = ["MAX_LISTED", "CompatReport", "check_lora_against_base"]

MAX_LISTED = 20
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

Tensors = Mapping[str, tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class CompatReport:
    """How a LoRA's modules line up with a base's weights (see the module docstring)."""

    checked: bool
    matched: int
    total: int
    missing: tuple[str, ...]
    shape_mismatches: tuple[str, ...]
    family_conflict: str | None
    unchecked_components: tuple[str, ...] = ()


class _KeyIndex:
    """Base component keys, looked up by diffusers module path or by kohya flattened name."""

    def __init__(self, tensors: Tensors, text_encoder: bool) -> None:
        self.tensors = tensors
        self.text_encoder = text_encoder
        self._flat: dict[str, str] | None = None

    def _flat_index(self) -> dict[str, str]:
        if self._flat is None:
            self._flat = {}
            for key in self.tensors:
                if key.endswith(".weight"):
                    flat = key[: -len(".weight")].replace(".", "_")
                    self._flat.setdefault(flat, key)
                    if self.text_encoder:
                        other = (
                            flat.removeprefix("text_model_")
                            if flat.startswith("text_model_")
                            else "text_model_" + flat
                        )
                        self._flat.setdefault(other, key)
        return self._flat

    def find(self, name: str) -> str | None:
        candidates = [f"{name}.weight"]
        if self.text_encoder:
            candidates += [f"text_model.{name}.weight", f"{name.removeprefix('text_model.')}.weight"]
        for candidate in candidates:
            if candidate in self.tensors:
                return candidate
        return self._flat_index().get(name.replace(".", "_"))


def _shape_problem(module: LoraModule, shape: tuple[int, ...]) -> str | None:
    """None when a LoRA of this module's in/out/kernel can be added to a weight of ``shape``."""
    if len(shape) < 2:
        return "base weight is not a matrix"
    base_kernel, kernel = tuple(shape[2:]), module.kernel
    ones = all(k == 1 for k in kernel) and all(k == 1 for k in base_kernel)
    if shape[0] == module.out_features and shape[1] == module.in_features and (kernel == base_kernel or ones):
        return None
    flattened = not kernel and base_kernel and shape[1] * math.prod(base_kernel) == module.in_features
    if shape[0] == module.out_features and flattened:
        return None
    return "shape"


def _describe(in_features: int, out_features: int, kernel: tuple[int, ...]) -> str:
    suffix = f" (kernel {'x'.join(map(str, kernel))})" if kernel and any(k != 1 for k in kernel) else ""
    return f"{in_features}→{out_features}{suffix}"


def _original_problem(family: Family, module: LoraModule, index: _KeyIndex) -> tuple[str, str | None] | None:
    """An original-layout module on a diffusers base: None when it is no such name (or the base lacks
    its modules), else (its first diffusers key, None when every part fits or the first misfit)."""
    found = match_lora_module(family, module.name)
    if found is None:
        return None
    keys = [f"{name}.weight" for name in found.diffusers]
    if any(key not in index.tensors for key in keys):
        return None  # not this base's layout: reported as missing by the caller
    heights = split_heights(found.split, len(keys), module.in_features, module.out_features)
    for key, height in zip(keys, heights or (0,) * len(keys), strict=True):
        shape = index.tensors[key][1]
        if len(shape) != 2 or shape != (height, module.in_features):
            theirs = _describe(shape[1] if len(shape) > 1 else 0, shape[0] if shape else 0, ())
            return keys[0], f"{key[: -len('.weight')]} ({found.original}) {theirs}"
    return keys[0], None


def _stored_problem(family: Family, module: LoraModule, index: _KeyIndex) -> tuple[str, str | None] | None:
    """A diffusers-named module on a base stored in the original layout (a BFL single file): None when
    the name has no original place there, else (the original key, None when its rows fit or why not)."""
    place = original_place(family, f"{module.name}.weight")
    if place is None or place.key not in index.tensors:
        return None
    shape = index.tensors[place.key][1]
    if len(shape) != 2:
        return place.key, f"{place.key} is not a matrix"
    heights = split_heights(place.split, place.parts, shape[1], shape[0])
    height = heights[place.part] if heights is not None else -1
    if (module.out_features, module.in_features) != (height, shape[1]):
        return place.key, f"{place.key} part {place.part + 1}/{place.parts} {_describe(shape[1], height, ())}"
    return place.key, None


def _label(module: LoraModule) -> str:
    return module.name if module.component in ("unet", "transformer") else f"{module.component}.{module.name}"


def base_variant(family: Family, base: BaseInfo) -> Variant | None:
    """The model of ``family`` a base is, from its denoisers' matrix widths (FLUX.2 dev or Klein, Wan
    1.3B or 14B); None when the family has no variants or the widths match none (a tiny test model)."""
    widths = {
        shape[1]
        for name in family.denoisers
        if name in base.components
        for _, shape in base.components[name].tensors.values()
        if len(shape) == 2
    }
    return variant_of_widths(family, widths)


def _variant_conflict(lora: LoraInfo, base: BaseInfo) -> str | None:
    """A LoRA made for a sibling model of the base's family (a Klein 4B LoRA on Klein 9B, a Wan 1.3B
    LoRA on a 14B expert), named both ways."""
    family = get_family(base.family)
    if family is None or not family.variants or lora.family not in (None, base.family):
        return None
    ours, theirs = lora_variant(family, lora.modules), base_variant(family, base)
    if ours is None or theirs is None or ours == theirs:
        return None
    return (
        f"the LoRA is a {ours.label} LoRA (hidden width {ours.width}) but the base is {theirs.label} "
        f"(hidden width {theirs.width})"
    )


def _family_conflict(lora: LoraInfo, base: BaseInfo, misfits: list[str]) -> str | None:
    """A LoRA of another family, named both ways; a LoRA of a family whose LoRAs the base's loader
    reads (FLUX.1 on Chroma) conflicts only when ``misfits`` (its modules the base lacks) is not empty."""
    if lora.family is None or base.family is None or lora.family == base.family:
        return _variant_conflict(lora, base)
    lora_label, base_label = family_label(lora.family), family_label(base.family)
    article = "an" if lora_label.startswith("S") else "a"  # "an SDXL", "a FLUX.1"
    conflict = (
        f"the LoRA is {article} {lora_label} LoRA ({lora.family_evidence}) but the base is {base_label} "
        f"({base.family_evidence})"
    )
    family = get_family(base.family)
    if family is None or lora.family not in family.reads_loras_of:
        return conflict
    if not misfits:
        return None
    return f"{conflict}, which lacks {len(misfits)} of its modules: {'; '.join(misfits[:3])}"


def _image_modules_conflict(family: Family | None, absent: list[LoraModule]) -> str | None:
    """An image-to-video LoRA (Wan I2V: image cross-attention ``cross_attn.k_img``/``v_img``, image
    embedder) on a base without those modules (T2V, or Wan 2.2 I2V-A14B): diffusers' loader skips them
    with a warning; lorarecipe drops nothing, so this is refused with both sides named."""
    if family is None or not family.image_modules:
        return None
    image = [m.name for m in absent if any(part in m.name for part in family.image_modules)]
    if not image:
        return None
    return (
        f"the LoRA is a {family.label} image-to-video LoRA ({len(image)} modules of the image "
        f"cross-attention, e.g. '{image[0]}') but the base has no image cross-attention (a text-to-video "
        f"model, or Wan 2.2 I2V-A14B): diffusers would skip those modules with a warning"
    )


def check_lora_against_base(lora: LoraInfo, base: BaseInfo) -> CompatReport:
    """LoRA + base -> which modules find a base weight, which do not, and which differ in shape."""
    by_component: dict[str, list[LoraModule]] = {}
    for module in lora.modules:
        by_component.setdefault(module.component, []).append(module)
    indexes = {name: _KeyIndex(c.tensors, name in _TEXT_ENCODERS) for name, c in base.components.items()}
    family = get_family(base.family)
    matched, total = 0, 0
    missing: list[str] = []
    mismatches: list[str] = []
    unchecked: list[str] = []
    image_conflict: str | None = None
    for component in sorted(by_component, key=COMPONENT_ORDER.index):
        modules = by_component[component]
        if component != "unknown" and component not in indexes:
            total += len(modules)
            missing += [f"{_label(m)} (the base has no {component})" for m in modules]
            continue
        if family is not None and component in indexes and component not in family.lora_components:
            total += len(modules)
            loads = ", ".join(family.lora_components)
            missing += [f"{_label(m)} ({family.label} loads LoRAs only into {loads})" for m in modules]
            continue
        searched = [indexes[component]] if component in indexes else list(indexes.values())
        found: list[tuple[LoraModule, str, _KeyIndex]] = []
        absent: list[LoraModule] = []
        originals: list[tuple[LoraModule, str | None]] = []  # original-layout modules: (module, problem)
        for module in modules:
            hit = next(((key, index) for index in searched if (key := index.find(module.name))), None)
            original = None
            if hit is None and family is not None and family.original_modules and component in indexes:
                original = _original_problem(family, module, indexes[component]) or _stored_problem(
                    family, module, indexes[component]
                )
            if hit is not None:
                found.append((module, hit[0], hit[1]))
            elif original is not None:
                originals.append((module, original[1]))
            else:
                absent.append(module)
        if not found and not originals:
            unchecked.append(component)  # names in a scheme this base does not use: cannot tell
            continue
        total += len(modules)
        missing += [_label(m) for m in absent]
        image_conflict = image_conflict or _image_modules_conflict(family, absent)
        for module, problem in originals:
            if problem is None:
                matched += 1
            else:
                ours = _describe(module.in_features, module.out_features, module.kernel)
                mismatches.append(f"{_label(module)}: LoRA {ours}, base {problem}")
        for module, key, index in found:
            shape = index.tensors[key][1]
            if _shape_problem(module, shape) is None:
                matched += 1
            else:
                ours = _describe(module.in_features, module.out_features, module.kernel)
                theirs = _describe(shape[1] if len(shape) > 1 else 0, shape[0] if shape else 0, shape[2:])
                mismatches.append(f"{_label(module)}: LoRA {ours}, base {theirs}")
    return CompatReport(
        checked=total > 0,
        matched=matched,
        total=total,
        missing=tuple(missing[:MAX_LISTED]),
        shape_mismatches=tuple(mismatches[:MAX_LISTED]),
        family_conflict=_family_conflict(lora, base, [*missing, *mismatches]) or image_conflict,
        unchecked_components=tuple(unchecked),
    )
