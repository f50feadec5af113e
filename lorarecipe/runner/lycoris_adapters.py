"""A LyCORIS/DoRA file -> each base weight's float32 ΔW and DoRA magnitude, one module at a time.

File + the loaded model's weight keys + family + scale convention (+ the experts a Wan 2.2 A14B file is
loaded into) -> :class:`LycorisAdapter`. The
compile-time classification (``inspect.lycoris_keys``) and placement (``inspect.adapter_targets``) run
again on the model actually built: a key no rule applies to, a module that finds no weight, a
non-finite factor fail the build naming them. For each weight it changes, ``delta(component, module)``
rebuilds the module's ΔW with :mod:`.adapter_math` from the factors as stored (read from the file when
asked, in float32), narrows it to that weight's rows (a fused original-layout module, e.g. FLUX.1's
``qkv``), swaps its row halves where the family's table says so, and reshapes it to the weight. The ΔW
of a module split over several weights is kept until another module is asked for (q, k and v are
asked one after another), so memory stays at about one module's factors and ΔW.

:func:`delta_terms` turns the LyCORIS adapters of a fuse or a grid column into ``fuse_math.DeltaTerm``
s, each with the weight the recipe gives its module (a number, per component, diffusers' UNet block
dicts via ``families.unet_blocks``, DiT blocks via ``families.blocks``) times ``lora_scale``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import BuildError, UnsafeInputError
from ..families import Family
from ..families.blocks import block_counts_from_keys, check_block_counts, module_weight, parse_block_weights
from ..families.unet_blocks import expand_unet_weights, unet_module_weight
from ..inspect import read_header
from ..inspect.adapter_targets import ModelKeys, PlacedModule, Placement, place_adapter
from ..inspect.loaded_as import lycoris_as_loaded
from ..inspect.lycoris_keys import LycorisModule, inspect_lycoris, module_tensors
from ..plan import thaw_weight
from .adapter_math import LokrConvention
from .fuse_math import DeltaTerm, DoraMagnitude

__all__ = ["LycorisAdapter", "delta_terms", "is_lycoris_file", "module_weights"]

ModuleKey = tuple[str, str]  # (component, module)


def is_lycoris_file(path: Path) -> bool:
    """Whether a LoRA file is one lorarecipe applies itself (LyCORIS/DoRA), from its header."""
    from ..inspect import inspect_lora

    return inspect_lora(read_header(path)).lycoris is not None


class LycorisAdapter:
    """One LyCORIS/DoRA file placed on a model (see the module docstring)."""

    def __init__(
        self,
        name: str,
        path: Path,
        keys: ModelKeys,
        family: Family | None,
        convention: str | None,
        load_into: Sequence[str] | None = None,
    ) -> None:
        self.name, self.path, self.keys, self.convention = name, path, keys, convention
        self.info = lycoris_as_loaded(inspect_lycoris(read_header(path)), family, load_into)
        if self.info.unclassified:
            shown = "; ".join(f"{u.key} ({u.reason})" for u in self.info.unclassified[:5])
            raise UnsafeInputError(
                f"{path.name}: {len(self.info.unclassified)} tensors are no adapter factor lorarecipe can "
                f"apply and would be dropped: {shown}"
            )
        report = place_adapter(self.info, keys, family)
        if report.problems:
            shown = "; ".join(report.problems[:5])
            raise BuildError(
                f"{path.name}: {len(report.problems)} of {len(self.info.modules)} modules find no weight of "
                f"this model they fit: {shown}"
            )
        if report.refused:
            shown = "; ".join(report.refused[:5])
            raise BuildError(
                f"{path.name}: {len(report.refused)} of {len(self.info.modules)} modules cannot be applied: "
                f"{shown}"
            )
        self.placed: dict[ModuleKey, tuple[PlacedModule, Placement]] = {
            (p.component, p.module): (placed, p) for placed in report.placed for p in placed.placements
        }
        self._kept: tuple[str, Any] | None = None  # (stem, full ΔW) of the last module split in parts

    def targets(self) -> list[ModuleKey]:
        """Every (component, module) whose weight this adapter changes, in file order."""
        return list(self.placed)

    def modules_per_component(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for component, _ in self.placed:
            counts[component] = counts.get(component, 0) + 1
        return counts

    def _tensors(self, module: LycorisModule) -> dict[str, Any]:
        """The module's tensors by role, float32, refused when not finite."""
        import torch
        from safetensors import safe_open

        out: dict[str, Any] = {}
        with safe_open(str(self.path), framework="pt") as handle:
            for role, key in module_tensors(module).items():
                tensor = handle.get_tensor(key).to(torch.float32)
                if not bool(torch.isfinite(tensor).all()):
                    raise UnsafeInputError(f"{self.path.name}: tensor {key!r} contains NaN/Inf values")
                out[role] = tensor
        return out

    def _alpha(self, module: LycorisModule, tensors: Mapping[str, Any]) -> float:
        """α: the ``.alpha`` tensor, else the PEFT metadata's, else α = r (scale 1, as trainers mean it)."""
        if "alpha" in tensors:
            if tensors["alpha"].numel() != 1:
                raise UnsafeInputError(f"{self.path.name}: {module.stem}.alpha is not a single value")
            return float(tensors["alpha"].reshape(()))
        if module.alpha is not None:
            return module.alpha
        return float(module.rank or 1)

    def _full_shape(self, placed: PlacedModule) -> tuple[int, ...]:
        shapes = [self.keys.shape(p.component, p.module) for p in placed.placements]
        return (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]

    def _module_delta(self, placed: PlacedModule) -> Any:
        """The module's whole ΔW, shaped like its whole weight (all parts of a fused module stacked)."""
        from . import adapter_math

        module = placed.module
        t = self._tensors(module)
        alpha, rank, shape = self._alpha(module, t), module.rank, self._full_shape(placed)
        if module.algorithm in ("lora", "locon-tucker"):
            delta = adapter_math.lora_delta(t["down"], t["up"], t.get("mid"), alpha=alpha, rank=rank or 1)
        elif module.algorithm.startswith("loha"):
            parts = (t["w1_a"], t["w1_b"], t["w2_a"], t["w2_b"], t.get("t1"), t.get("t2"))
            delta = adapter_math.loha_delta(*parts, alpha=alpha, rank=rank or 1, shape=shape)
        else:
            w1 = t["w1"] if "w1" in t else (t["w1_a"], t["w1_b"])
            w2 = (
                t["w2"]
                if "w2" in t
                else (t["t2"], t["w2_a"], t["w2_b"])
                if "t2" in t
                else (t["w2_a"], t["w2_b"])
            )
            convention: LokrConvention = (
                "peft" if (self.convention or module.convention) == "peft" else "lycoris"
            )
            delta = adapter_math.lokr_delta(
                w1, w2, alpha=alpha, rank=rank, shape=shape, convention=convention
            )
        if delta.numel() != math.prod(shape) or delta.shape[0] != shape[0]:
            raise BuildError(
                f"{self.path.name}: {module.stem} ΔW {list(delta.shape)} does not fit {list(shape)}"
            )
        return delta.reshape(shape)

    def _rows(self, tensor: Any, placement: Placement) -> Any:
        """The rows of a whole-module tensor (ΔW or a per-row magnitude) that belong to one weight."""
        import torch

        if placement.rows is not None:
            tensor = tensor[placement.rows[0] : placement.rows[1]]
        if placement.swap_halves:  # BFL shift|scale -> diffusers scale|shift
            shift, scale = tensor.chunk(2, dim=0)
            tensor = torch.cat([scale, shift], dim=0)
        return tensor

    def delta(self, component: str, module: str) -> Any:
        """A fresh float32 ΔW for one weight, at the file's own scale, shaped like the weight."""
        placed, placement = self.placed[(component, module)]
        if len(placed.placements) == 1:
            full = self._module_delta(placed)
        else:
            if self._kept is None or self._kept[0] != placed.module.stem:
                self._kept = (placed.module.stem, self._module_delta(placed))
            full = self._kept[1]
        part = self._rows(full, placement)
        out = part.reshape(self.keys.shape(component, module))
        return out.clone() if len(placed.placements) > 1 or placement.swap_halves else out

    def dora(self, component: str, module: str) -> DoraMagnitude | None:
        """The module's DoRA magnitude for one weight (rows narrowed like ΔW), or None."""
        from .adapter_math import LYCORIS_DORA_EPS

        placed, placement = self.placed[(component, module)]
        if placed.dora_axis is None:
            return None
        t = self._tensors(placed.module)
        magnitude = (t["magnitude"] if "magnitude" in t else t["dora_scale"]).flatten()
        if placed.dora_axis == "row":
            magnitude = self._rows(magnitude, placement)
        eps = 0.0 if placed.module.dora == "dora-peft" else LYCORIS_DORA_EPS
        return DoraMagnitude(magnitude.contiguous(), placed.dora_axis, eps)


def module_weights(weight: Any, family: Family | None, keys: ModelKeys) -> Callable[[str, str], float]:
    """A recipe weight (number, per-component dict, UNet block dict, DiT block spec) -> the weight of
    each (component, module), as diffusers/PEFT give a LoRA layer on that module."""
    value = thaw_weight(weight)
    if not isinstance(value, dict):
        return lambda component, module: float(value)
    unet = value.get("unet")
    expanded = expand_unet_weights(unet, keys.shapes.get("unet", {})) if isinstance(unet, dict) else {}
    blocks: dict[str, Any] = {}  # denoiser -> its parsed DiT block weights (Wan 2.2: per expert)
    for component in family.denoisers if family is not None else ("transformer",):
        spec = value.get(component)
        if component == "unet" or not isinstance(spec, dict):
            continue
        if family is None:
            raise BuildError("per-block transformer weights need the base's family")
        parsed, problems = parse_block_weights(family, spec)
        if parsed is not None:
            counts = block_counts_from_keys(family, keys.shapes.get(component, {}))
            problems = check_block_counts(parsed, counts)
        if parsed is None or problems:
            raise BuildError(f"per-block {component} weights: " + "; ".join(p.message for p in problems))
        blocks[component] = parsed

    def weight_of(component: str, module: str) -> float:
        part = value.get(component, 1.0)
        if isinstance(part, dict) and component == "unet":
            return unet_module_weight(expanded, module)
        if isinstance(part, dict):
            assert family is not None and component in blocks
            return module_weight(family, blocks[component], module)
        return float(part)

    return weight_of


def delta_terms(
    adapters: Sequence[tuple[LycorisAdapter, Any]],
    lora_scale: float,
    family: Family | None,
    components: Sequence[str] | None = None,
) -> dict[tuple[str, str], list[DeltaTerm]]:
    """(adapter, recipe weight) pairs in fuse order -> {(component, weight key): terms in that order}."""
    out: dict[tuple[str, str], list[DeltaTerm]] = {}
    for adapter, weight in adapters:
        try:
            weight_of = module_weights(weight, family, adapter.keys)
        except ValueError as exc:
            raise BuildError(f"adapter {adapter.name!r}: {exc}") from None
        for component, module in adapter.targets():
            if components is not None and component not in components:
                continue
            strength = weight_of(component, module)
            if lora_scale != 1:
                strength *= lora_scale
            dora = adapter.placed[(component, module)][0].dora_axis is not None
            term = DeltaTerm(
                adapter.name,
                functools.partial(adapter.delta, component, module),
                strength,
                functools.partial(adapter.dora, component, module) if dora else None,  # type: ignore[arg-type]
            )
            out.setdefault((component, f"{module}.weight"), []).append(term)
    return out
