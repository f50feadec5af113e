"""An ``extract`` merge on the pipeline: any adapters -> one plain LoRA adapter, module by module.

MergeAdapters step (method ``extract``) + the loaded pipeline -> a new PEFT LoRA adapter in it (so
LoRA outputs in diffusers and kohya layouts, mixes, fuses and grids take it like any LoRA) and a report
for the manifest: each module's rank and relative Frobenius error. Per module the inputs' deltas are
summed in float32 in the merge's order, each times its weight: a LoRA or PEFT merge as PEFT computes it
(``fuse_math``'s PEFT-exact product), a LyCORIS adapter's ΔW (``lycoris_adapters``), a DoRA adapter's
update W' − W against the base weight; then ``extract.extract_lora`` re-factors the sum. One module's
delta at a time, on one thread (the SVD's result depends on the thread count).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from ...errors import BuildError
from ...families import get_family
from ...plan import MergeAdapters
from ..extract import ExtractedLora, extract_lora
from ..fuse_math import FuseTerm, native_scaling, scaled_delta
from ..lycoris_adapters import LycorisAdapter, delta_terms
from .adapters import check_injected
from .lycoris import update_of

__all__ = ["extract_merge"]

ModuleKey = tuple[str, str]
_TE_NAMES = ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight")


def _lora_deltas(pipe: Any, name: str, weight: float) -> dict[ModuleKey, Callable[[], Any]]:
    """A PEFT adapter's per-module deltas × weight, with PEFT's float operations."""
    from ..streaming.factors import factors_from_model
    from .merge import lora_components

    out: dict[ModuleKey, Callable[[], Any]] = {}
    for component in lora_components(pipe):
        found = factors_from_model(component, getattr(pipe, component), [name])[name]
        for key, factor in found.items():
            term = FuseTerm(name, factor, native_scaling(factor, weight, 1.0))
            out[key] = functools.partial(scaled_delta, term)
    return out


def _lycoris_deltas(
    pipe: Any, adapter: LycorisAdapter, weight: float, family: str | None
) -> dict[ModuleKey, Callable[[], Any]]:
    """A LyCORIS/DoRA adapter's per-weight contribution × weight: s·ΔW, or s·(W' − W) for DoRA."""
    terms = delta_terms([(adapter, weight)], 1.0, get_family(family))
    return {
        (component, key.removesuffix(".weight")): functools.partial(update_of, pipe, component, key, found)
        for (component, key), found in terms.items()
    }


def extract_merge(
    pipe: Any, step: MergeAdapters, lycoris: Mapping[str, LycorisAdapter], family: str | None
) -> dict[str, Any]:
    """Run one ``extract`` merge into adapter ``step.name`` of ``pipe``; returns its manifest report."""
    import torch

    if step.svd_rank is None:
        raise BuildError(f"merge {step.name!r}: method 'extract' needs svd_rank")
    sources: list[dict[ModuleKey, Callable[[], Any]]] = []
    for name, weight in zip(step.adapters, step.weights, strict=True):
        if name in lycoris:
            sources.append(_lycoris_deltas(pipe, lycoris[name], weight, family))
        else:
            sources.append(_lora_deltas(pipe, name, weight))
    modules = sorted(
        {k for source in sources for k in source if step.components is None or k[0] in step.components}
    )
    if not modules:
        raise BuildError(f"merge {step.name!r}: its adapters change no module of the components asked")
    extracted: dict[ModuleKey, ExtractedLora] = {}
    zero: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # an SVD rounds differently with other thread counts
    try:
        for key in modules:
            total = None
            for source in sources:
                if key in source:
                    part = source[key]()
                    total = part if total is None else total.add_(part)
            assert total is not None
            found = extract_lora(total, step.svd_rank, step.svd_energy, step.svd_clamp)
            if found is None:
                zero.append(f"{key[0]}.{key[1]}")
            else:
                extracted[key] = found
    finally:
        torch.set_num_threads(threads)
    if not extracted:
        raise BuildError(f"merge {step.name!r}: every module's summed delta is zero; nothing to extract")
    state = {}
    for (component, module), found in extracted.items():
        # text encoders in diffusers' own (non-PEFT) names: its text-encoder loader only recognizes PEFT
        # keys when some q/k/v/out_proj is among them, which an extraction need not have
        names = ("lora_A.weight", "lora_B.weight") if component in ("unet", "transformer") else _TE_NAMES
        state[f"{component}.{module}.{names[0]}"] = found.down
        state[f"{component}.{module}.{names[1]}"] = found.up
    pipe.load_lora_weights(state, adapter_name=step.name)
    expected: dict[str, set[str]] = {}
    for component, module in extracted:
        expected.setdefault(component, set()).add(module)
    check_injected(pipe, step.name, expected, f"merge {step.name!r}")
    errors = {
        f"{c}.{m}": {"rank": e.rank, "relative_error": e.relative_error} for (c, m), e in extracted.items()
    }
    return {
        "svd_rank": step.svd_rank,
        "svd_energy": step.svd_energy,
        "svd_clamp": step.svd_clamp,
        "max_relative_error": max(e["relative_error"] for e in errors.values()),
        "modules": errors,
        "zero_modules": zero,
    }
