"""An ``extract`` merge on the pipeline: any adapters -> one plain LoRA adapter, module by module.

MergeAdapters step (method ``extract``) + the loaded pipeline -> a new PEFT LoRA adapter in it (so
LoRA outputs in diffusers and kohya layouts, mixes, fuses and grids take it like any LoRA) and a report
for the manifest: each module's rank and relative Frobenius error. Per module the inputs' deltas are
summed in float32 in the merge's order, each times its weight: a LoRA or PEFT merge as PEFT computes it
(``fuse_math``'s PEFT-exact product), a LyCORIS adapter's ΔW (``lycoris_adapters``), a DoRA adapter's
update W' − W against the base weight, a checkpoint's difference from the base (read weight by weight;
what no LoRA can hold — biases, norms, embeddings — is listed in the report, not dropped silently);
then ``extract.extract_lora`` re-factors the sum. One module's
delta at a time, on one thread (the SVD's result depends on the thread count).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
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


def _checkpoint_index(folder: Path) -> dict[str, Path]:
    """Every tensor key of a diffusers component folder's safetensors files -> its file."""
    from safetensors import safe_open

    from ...inspect.base_model import weight_files

    index: dict[str, Path] = {}
    for file in weight_files(folder, None)[0]:
        with safe_open(str(file), framework="pt") as handle:
            index.update(dict.fromkeys(handle.keys(), file))
    return index


def _read(file: Path, key: str) -> Any:
    import torch
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(key).to(torch.float32)


def _difference_deltas(
    pipe: Any, folder: Path, weight: float, family: str | None, unrepresented: dict[str, float]
) -> dict[ModuleKey, Callable[[], Any]]:
    """(checkpoint − base) × weight for every Linear/Conv2d weight of the adapter components. Every
    other parameter that differs (a bias, a norm, an embedding: no LoRA holds it) is recorded in
    ``unrepresented`` with its relative difference, never dropped silently."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..streaming.sources import resolve_key
    from .lycoris import model_keys

    out: dict[ModuleKey, Callable[[], Any]] = {}
    for component in model_keys(pipe, family).shapes:
        if not (folder / component).is_dir():
            continue
        index, model = _checkpoint_index(folder / component), getattr(pipe, component)
        for name, param in model.named_parameters():
            if ".lora_" in name:
                continue
            key = name.replace(".base_layer.", ".")
            stored = resolve_key(index, key)
            if stored is None:
                unrepresented[f"{component}.{key}"] = float("nan")  # the checkpoint lacks it
                continue
            module_name, _, attribute = key.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            if isinstance(module, BaseTunerLayer):
                module = module.get_base_layer()
            if attribute == "weight" and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                out[(component, module_name)] = functools.partial(
                    _difference, index[stored], stored, param, weight
                )
                continue
            base = param.detach().to(torch.float32)
            change = _read(index[stored], stored) - base
            if bool((change != 0).any()):
                unrepresented[f"{component}.{key}"] = float(change.norm() / base.norm().clamp(min=1e-30))
    return out


def _difference(file: Path, key: str, param: Any, weight: float) -> Any:
    import torch

    with torch.no_grad():
        change = _read(file, key) - param.detach().to(torch.float32)
        return change.mul_(weight) if weight != 1 else change


def extract_merge(
    pipe: Any,
    step: MergeAdapters,
    lycoris: Mapping[str, LycorisAdapter],
    family: str | None,
    checkpoints: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """Run one ``extract`` merge into adapter ``step.name`` of ``pipe``; returns its manifest report.
    ``checkpoints``: the inputs that are checkpoint differences (name -> diffusers folder)."""
    import torch

    if step.svd_rank is None:
        raise BuildError(f"merge {step.name!r}: method 'extract' needs svd_rank")
    checkpoints = checkpoints or {}
    unrepresented: dict[str, float] = {}
    sources: list[dict[ModuleKey, Callable[[], Any]]] = []
    for name, weight in zip(step.adapters, step.weights, strict=True):
        if name in lycoris:
            sources.append(_lycoris_deltas(pipe, lycoris[name], weight, family))
        elif name in checkpoints:
            sources.append(_difference_deltas(pipe, checkpoints[name], weight, family, unrepresented))
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
        **({"not_representable": unrepresented} if checkpoints else {}),
    }
