"""A LyCORIS/DoRA file's modules -> the base weights each one changes (names and shapes only, torch-free).

Module name as stored (kohya ``lora_unet_…``/``lora_te…``, LyCORIS ``lycoris_…``, diffusers/PEFT dotted
names, LDM/SGM UNet names, a family's original layout such as FLUX.1's BFL names) + one model's weight
keys and shapes -> a :class:`Placement` per weight: which weight, which rows of the module's ΔW go
there (a fused original-layout module — FLUX.1's ``qkv``, ``linear1`` — is narrowed by rows onto
to_q/to_k/to_v(/proj_mlp), as ComfyUI narrows it), and whether its two row halves are swapped.

Every lookup is exact, never a guess: a dotted name as the model names it; a flattened (kohya) name in
an index of the model's own module names, where a name two modules flatten to is refused; the family's
original-layout table (``families.original_names``); the LDM/SGM UNet table of the single-file writer
(``outputs.singlefile_names``, whose inverse reads SDXL's kohya names). The compiler runs it on header
keys, both executors on the loaded model's keys, so the static check and the build place every module
the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from ..families import Family
from ..families.original_names import match_lora_module, split_heights
from ..families.spec import Split
from .lycoris_keys import DoraAxis, LycorisInfo, LycorisModule, dora_axis, fits

__all__ = ["ModelKeys", "PlacedModule", "Placement", "PlacementReport", "place_adapter"]

Shape = tuple[int, ...]
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class Placement:
    """One base weight a module changes: ``component``.``module``.weight, rows ``rows`` of the
    module's ΔW (None: all of them), with the two row halves swapped (FLUX.1's final adaLN)."""

    component: str
    module: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False

    @property
    def key(self) -> str:
        return f"{self.module}.weight"


@dataclass(frozen=True)
class PlacedModule:
    """A module and the weights it changes; ``dora_axis`` decided against the base weight's shape
    (the whole fused weight for an original-layout module), None without DoRA."""

    module: LycorisModule
    placements: tuple[Placement, ...]
    dora_axis: DoraAxis | None = None


@dataclass(frozen=True)
class PlacementReport:
    """Every classified module placed, or a line saying why it cannot be: ``problems`` (no base weight
    it fits: names, shapes, clashes) or ``refused`` (it fits, but holds what lorarecipe does not apply:
    a bias delta, non-float factors, a DoRA axis the shapes cannot decide or a fused module splits)."""

    placed: tuple[PlacedModule, ...]
    problems: tuple[str, ...]
    refused: tuple[str, ...] = ()

    def touched(self) -> dict[str, int]:
        """component -> number of base weights the adapter changes."""
        out: dict[str, int] = {}
        for placed in self.placed:
            for p in placed.placements:
                out[p.component] = out.get(p.component, 0) + 1
        return out


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _unet_config_from_keys(shapes: Mapping[str, Shape]) -> dict[str, object]:
    """What the LDM/SGM mapper needs of a UNet's config, read off its own keys: resnets per down block
    and SDXL's added time embedding."""
    resnets = {
        int(parts[3]) for key in shapes if (parts := key.split("."))[:3] == ["down_blocks", "0", "resnets"]
    }
    config: dict[str, object] = {"layers_per_block": max(resnets) + 1 if resnets else 2}
    if any(key.startswith("add_embedding.") for key in shapes):
        config["addition_embed_type"] = "text_time"
    return config


class ModelKeys:
    """One model's weight keys and shapes per component, and the exact lookups of the module docstring."""

    def __init__(self, components: Mapping[str, Mapping[str, Shape]]) -> None:
        self.shapes = {c: dict(table) for c, table in components.items()}
        self.modules = {
            c: {k[: -len(".weight")] for k, s in table.items() if k.endswith(".weight") and len(s) >= 2}
            for c, table in self.shapes.items()
        }

    @cached_property
    def _flat_index(self) -> dict[str, dict[str, set[str]]]:
        """component -> flattened name -> the modules that flatten to it (text encoders: with and
        without a ``text_model`` segment, which transformers 5 dropped and files keep)."""
        out: dict[str, dict[str, set[str]]] = {}
        for component, modules in self.modules.items():
            index = out.setdefault(component, {})
            for module in modules:
                flat = _flat(module)
                names = {flat}
                if component in _TEXT_ENCODERS:
                    names.add(
                        flat.removeprefix("text_model_")
                        if flat.startswith("text_model_")
                        else f"text_model_{flat}"
                    )
                for name in names:
                    index.setdefault(name, set()).add(module)
        return out

    @cached_property
    def _original_unet_index(self) -> dict[str, dict[str, str]]:
        """UNet only: LDM/SGM module names (dotted and flattened) -> the diffusers module."""
        from ..outputs.singlefile_names import map_unet_keys

        shapes = self.shapes.get("unet")
        if not shapes:
            return {}
        try:
            targets = map_unet_keys(shapes, _unet_config_from_keys(shapes))
        except ValueError:  # a UNet the LDM layout cannot express has no LDM names to read
            return {}
        dotted: dict[str, str] = {}
        for key, target in targets.items():
            if (
                target is not None
                and key.endswith(".weight")
                and key[: -len(".weight")] in self.modules["unet"]
            ):
                dotted[target.key[: -len(".weight")]] = key[: -len(".weight")]
        flat = {_flat(name): module for name, module in dotted.items()}
        return {"dotted": dotted, "flat": flat}

    def find(self, component: str, name: str) -> str | None:
        """A stored module name -> the module as this model names it; None when absent or ambiguous."""
        modules = self.modules.get(component, set())
        candidates = [name]
        if component in _TEXT_ENCODERS:
            candidates += [f"text_model.{name}", name.removeprefix("text_model.")]
        for candidate in candidates:
            if candidate in modules:
                return candidate
        if "." not in name:
            found = self._flat_index.get(component, {}).get(name, set())
            if len(found) == 1:
                return next(iter(found))
            if found:
                return None  # two modules flatten to this name: refuse rather than pick one
        if component == "unet":
            index = self._original_unet_index
            return index.get("flat" if "." not in name else "dotted", {}).get(name)
        return None

    def ambiguous(self, component: str, name: str) -> list[str]:
        return sorted(self._flat_index.get(component, {}).get(name, set())) if "." not in name else []

    def shape(self, component: str, module: str) -> Shape:
        return self.shapes[component][f"{module}.weight"]


def _describe(shape: Shape) -> str:
    return "×".join(map(str, shape))


def _original(
    module: LycorisModule, family: Family, keys: ModelKeys, component: str
) -> tuple[Placement, ...] | str | None:
    """A module in the family's original layout -> its diffusers parts, by rows; None: not such a name."""
    found = match_lora_module(family, module.module)
    if found is None or component not in family.denoisers:
        return None
    missing = [name for name in found.diffusers if name not in keys.modules.get(component, set())]
    if missing:
        return None
    out, inp = module.delta_shape[0], math.prod(module.delta_shape[1:])
    heights = split_heights(found.split, len(found.diffusers), inp, out)
    if heights is None:
        return f"ΔW {_describe(module.delta_shape)} cannot be split into {found.original}'s parts"
    placements, start = [], 0
    for name, height in zip(found.diffusers, heights, strict=True):
        shape = keys.shape(component, name)
        if math.prod(shape) != height * inp or shape[0] != height:
            return f"part {name} is {_describe(shape)}, ΔW rows give {height}×{inp}"
        rows = None if len(found.diffusers) == 1 else (start, start + height)
        placements.append(Placement(component, name, rows, found.split is Split.SWAP_HALVES))
        start += height
    return tuple(placements)


def _place(module: LycorisModule, keys: ModelKeys, family: Family | None) -> tuple[Placement, ...] | str:
    components = [module.component] if module.component != "unknown" else sorted(keys.modules)
    model_part = module.component in (*_TEXT_ENCODERS, "unet", "transformer")
    if family is not None and model_part and module.component not in family.lora_components:
        takes = ", ".join(family.lora_components)
        return f"{family.label} takes adapters only in {takes}, not in its {module.component}"
    hits = [(c, found) for c in components if c in keys.modules and (found := keys.find(c, module.module))]
    if len(hits) == 1:
        component, name = hits[0]
        shape = keys.shape(component, name)
        if not fits(module, shape):
            return f"ΔW {_describe(module.delta_shape)} does not fit {component}.{name} ({_describe(shape)})"
        return (Placement(component, name),)
    if len(hits) > 1:
        return f"found in several components ({', '.join(c for c, _ in hits)})"
    for component in components:
        if family is not None and family.original_modules and component in keys.modules:
            original = _original(module, family, keys, component)
            if original is not None:
                return original
    if module.component != "unknown" and module.component not in keys.modules:
        return f"the base has no {module.component}"
    clash = [n for c in components for n in keys.ambiguous(c, module.module)]
    if clash:
        return f"the flattened name fits several modules ({', '.join(clash)}); refusing to pick one"
    return f"no such module in the base's {'/'.join(components)}"


def _dora(module: LycorisModule, placements: tuple[Placement, ...], keys: ModelKeys) -> DoraAxis | str | None:
    """The DoRA axis against the real weight (all parts of a fused module stacked), or why not."""
    if module.dora is None or module.dora_shape is None:
        return None
    shapes = [keys.shape(p.component, p.module) for p in placements]
    weight = (sum(s[0] for s in shapes), *shapes[0][1:])
    try:
        axis = dora_axis(
            module.dora_shape, weight, source="peft" if module.dora == "dora-peft" else "lycoris"
        )
    except ValueError as exc:
        return f"DoRA axis undecided: {exc}"
    if axis == "column" and len(placements) > 1:
        return (
            f"DoRA normalizes each input column of the fused module over all {len(placements)} parts, "
            "which are separate diffusers weights here; lorarecipe does not fuse that"
        )
    return axis


def place_adapter(info: LycorisInfo, keys: ModelKeys, family: Family | None) -> PlacementReport:
    """Every classified module of ``info`` -> its placements on ``keys`` (see the module docstring)."""
    placed: list[PlacedModule] = []
    problems: list[str] = []
    refused: list[str] = []
    changed: dict[tuple[str, str], str] = {}  # weight -> the module that changes it
    for module in info.modules:
        held = [n for n in module.notes if n.startswith(("also adds a bias delta", "non-float factor"))]
        if held:
            refused.append(f"{module.stem}: {held[0]}, which lorarecipe does not apply")
            continue
        found = _place(module, keys, family)
        for placement in () if isinstance(found, str) else found:
            other = changed.setdefault((placement.component, placement.module), module.stem)
            if other != module.stem:
                found = f"changes {placement.component}.{placement.module}, which {other} changes too"
        if isinstance(found, str):
            problems.append(f"{module.stem}: {found}")
            continue
        axis = _dora(module, found, keys)
        if isinstance(axis, str) and axis not in ("row", "column"):
            refused.append(f"{module.stem}: {axis}")
            continue
        placed.append(PlacedModule(module, found, axis))  # type: ignore[arg-type]
    return PlacementReport(tuple(placed), tuple(problems), tuple(refused))
