"""The LyCORIS/DoRA part of a streamed fuse: which fused adapters lorarecipe applies itself, and their terms.

FuseAdapters step + the adapter files -> the LoRA-only fuse that diffusers/PEFT decide on the skeleton
(or the factor cache) as before, and the LyCORIS/DoRA adapters with their weights; then, given the
weight keys the output is written under, each adapter's ``DeltaTerm`` s joined into the fuse targets
(``fuse_math`` applies them before the LoRA terms, the whole tensor at a time). The terms are built by
``runner.lycoris_adapters.delta_terms``, the function the pipeline route uses too. ``extract`` merges
run on the pipeline route (they may read base weights): a fuse that needs one is refused here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...errors import BuildError, StreamingUnsupported
from ...families import get_family
from ...inspect.adapter_targets import ModelKeys
from ...plan import FuseAdapters, LoadAdapter, MergeAdapters, Plan
from ...recipe.vocabulary import COMBINATION_TYPES
from ..fuse_math import FuseTarget
from ..lycoris_adapters import LycorisAdapter, delta_terms, is_lycoris_file

__all__ = ["LycorisPart", "split_fuse"]


@dataclasses.dataclass(frozen=True)
class LycorisPart:
    """The fused LyCORIS/DoRA adapters of one fuse, in fuse order, with their weights."""

    steps: tuple[tuple[LoadAdapter, Any], ...]
    lora_scale: float
    components: tuple[str, ...] | None

    def join(
        self,
        targets: Mapping[tuple[str, str], FuseTarget],
        shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
        adapter_paths: Mapping[str, Path],
        family_key: str | None,
    ) -> dict[tuple[str, str], FuseTarget]:
        """The LoRA ``targets`` with every LyCORIS/DoRA term added, all keyed by the weight keys of
        ``shapes`` (the keys the output is written under)."""
        if not self.steps:
            return dict(targets)
        family = get_family(family_key)
        wanted = family.lora_components if family is not None else tuple(shapes)
        keys = ModelKeys({c: shapes[c] for c in wanted if c in shapes})
        adapters = [
            (
                LycorisAdapter(
                    step.name,
                    Path(adapter_paths[step.name]),
                    keys,
                    family,
                    step.scale_convention,
                    step.load_into,
                ),
                w,
            )
            for step, w in self.steps
        ]
        terms = delta_terms(adapters, self.lora_scale, family, self.components)
        out = dict(targets)
        for key, found in terms.items():
            current = out.get(key)
            module = key[1].removesuffix(".weight")
            if current is None:
                out[key] = FuseTarget(key[0], module, (), tuple(found))
            else:
                out[key] = dataclasses.replace(current, deltas=tuple(found))
        return out


def split_fuse(
    plan: Plan, fuse: FuseAdapters, adapter_paths: Mapping[str, Path]
) -> tuple[FuseAdapters, LycorisPart]:
    """A fuse -> (its LoRA adapters as a fuse of their own, its LyCORIS/DoRA part)."""
    loads = {s.name: s for s in plan.of_type(LoadAdapter)}
    merges = {s.name: s for s in plan.of_type(MergeAdapters)}
    for merge in merges.values():
        if not COMBINATION_TYPES[merge.method].peft and merge.name in _needed(plan, fuse):
            raise StreamingUnsupported(
                f"merge {merge.name!r} uses method {merge.method!r}, which runs on the pipeline route"
            )
    lora: list[tuple[str, Any]] = []
    lycoris: list[tuple[LoadAdapter, Any]] = []
    for name, weight in zip(fuse.adapters, fuse.weights, strict=True):
        if name in loads and name in adapter_paths and is_lycoris_file(Path(adapter_paths[name])):
            lycoris.append((loads[name], weight))
        else:
            lora.append((name, weight))
    for merge in merges.values():
        if merge.name in _needed(plan, fuse) and any(
            a in loads and a in adapter_paths and is_lycoris_file(Path(adapter_paths[a]))
            for a in merge.adapters
        ):
            raise BuildError(f"merge {merge.name!r}: PEFT's add_weighted_adapter merges only LoRAs")
    lora_fuse = dataclasses.replace(
        fuse, adapters=tuple(n for n, _ in lora), weights=tuple(w for _, w in lora)
    )
    return lora_fuse, LycorisPart(tuple(lycoris), fuse.lora_scale, fuse.components)


def _needed(plan: Plan, fuse: FuseAdapters) -> set[str]:
    """The names of every adapter and merge the fused adapters are made of."""
    by_name = {s.name: s.id for s in plan.steps if isinstance(s, (LoadAdapter, MergeAdapters))}
    steps = plan.dependencies(*(by_name[n] for n in fuse.adapters if n in by_name))
    return {s.name for s in steps if isinstance(s, (LoadAdapter, MergeAdapters))}
