"""LyCORIS/DoRA adapters on a loaded pipeline: applied to its weights in place, restored from copies.

diffusers cannot load these files (no LoHa, LoKr only in some layouts, ``dora_scale`` dropped), so
lorarecipe rebuilds each module's ΔW itself (``runner.lycoris_adapters``) and changes the pipeline's
own weights with ``fuse_math.apply_delta_term``, the arithmetic the streaming fuser uses: a float32
build is bit-identical on both routes. A fuse keeps the change (applied before ``fuse_lora`` adds the
LoRA terms, the order ``fuse_math`` documents); a grid cell undoes it afterwards from a copy of every
weight it touched, never by subtracting (that would not give the base back bit for bit, and DoRA has
no inverse).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import BuildError
from ...families import get_family
from ...inspect.adapter_targets import ModelKeys
from ..fuse_math import DeltaTerm, apply_delta_term, delta_term_update
from ..lycoris_adapters import LycorisAdapter

__all__ = ["applied", "apply_terms", "load_lycoris", "model_keys", "update_of"]

_PEFT_PARTS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lora_embedding_", ".lora_dropout")


def model_keys(pipe: Any, family_key: str | None) -> ModelKeys:
    """The weight keys and shapes of the pipeline's adaptable components, named as without PEFT layers."""
    family = get_family(family_key)
    components = family.lora_components if family is not None else getattr(pipe, "_lora_loadable_modules", [])
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for component in components:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        table: dict[str, tuple[int, ...]] = {}
        for key, value in model.state_dict().items():
            if not any(part in key for part in _PEFT_PARTS):
                table[key.replace(".base_layer.", ".")] = tuple(value.shape)
        shapes[component] = table
    return ModelKeys(shapes)


def load_lycoris(
    name: str,
    path: Path,
    keys: ModelKeys,
    family_key: str | None,
    convention: str | None,
    load_into: Sequence[str] | None = None,
) -> LycorisAdapter:
    """A LyCORIS/DoRA file placed on the pipeline's weights (every key and module accounted for);
    ``load_into``: the experts it goes into (Wan 2.2 A14B)."""
    return LycorisAdapter(name, path, keys, get_family(family_key), convention, load_into)


def _parameter(pipe: Any, component: str, key: str) -> Any:
    """The parameter a weight key names (the base layer's, when PEFT wrapped the module)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    module_name, _, attribute = key.rpartition(".")
    module = getattr(pipe, component).get_submodule(module_name)
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return getattr(module, attribute)


def _apply_one(param: Any, terms: Sequence[DeltaTerm], where: str) -> bool:
    """float32 copy of the weight + each term in order, rounded once into the parameter; whether it
    changed."""
    import torch

    with torch.no_grad():
        weight = param.data.to(torch.float32, copy=True)
        for term in terms:
            apply_delta_term(weight, term)
        if not bool(torch.isfinite(weight).all()):
            raise BuildError(f"weight {where} contains NaN/Inf after applying {terms[0].adapter!r}")
        rounded = weight.to(param.dtype)
        changed = not torch.equal(rounded, param.data)
        param.data.copy_(rounded)
    return changed


def apply_terms(pipe: Any, terms: Mapping[tuple[str, str], Sequence[DeltaTerm]]) -> tuple[int, int]:
    """Apply LyCORIS/DoRA terms to the pipeline's weights for good; (weights changed, weights the terms
    apply to). Like the streaming fuser, a ΔW that rounds away in the weight's dtype is no error: every
    module of the file was placed on its weight before (``LycorisAdapter``), none is dropped."""
    changed = 0
    for (component, key), found in terms.items():
        changed += _apply_one(_parameter(pipe, component, key), found, f"{component}.{key}")
    return changed, len(terms)


def update_of(pipe: Any, component: str, key: str, terms: Sequence[DeltaTerm]) -> Any:
    """The float32 change ``terms`` would make to one weight of the pipeline (summed, not applied)."""
    import torch

    with torch.no_grad():
        weight = _parameter(pipe, component, key).data.to(torch.float32)
        total = None
        for term in terms:
            update = delta_term_update(weight, term)
            total = update if total is None else total.add_(update)
    return total


@contextlib.contextmanager
def applied(pipe: Any, terms: Mapping[tuple[str, str], Sequence[DeltaTerm]]) -> Iterator[None]:
    """The terms applied while the block runs; every touched weight restored from its copy afterwards."""
    saved: list[tuple[Any, Any]] = []
    try:
        for (component, key), found in terms.items():
            param = _parameter(pipe, component, key)
            saved.append((param, param.data.clone()))
            _apply_one(param, found, f"{component}.{key}")
        yield
    finally:
        import torch

        with torch.no_grad():
            for param, copy in saved:
                param.data.copy_(copy)
