"""set_adapters + fuse_lora + unload on a pipeline, then prove the fuse did what it should.

FuseAdapters step + pipeline with adapters -> fused base weights, LoRA layers removed. LyCORIS/DoRA
adapters are applied by lorarecipe first (``pipeline.lycoris``), then the LoRAs are fused. The weights
of each fused adapter are set explicitly first (unfuse/set_adapters traps never arise: we never
unfuse). Afterwards every parameter is compared with a fingerprint taken before: weights must have
changed exactly where a fused adapter applies with a non-zero scale, nowhere else, and no fused
weight may be NaN/Inf.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import BuildError
from ...families import get_family
from ...families.blocks import BlockWeights, block_counts_from_config, check_block_counts, parse_block_weights
from ...plan import FuseAdapters, thaw_weight
from ..lycoris_adapters import LycorisAdapter, delta_terms
from .lycoris import apply_terms
from .merge import lora_components

__all__ = ["FuseReport", "apply_mix", "fuse_adapters"]


@dataclass(frozen=True)
class FuseReport:
    changed: int  # base weights that changed
    expected: int  # base weights a fused adapter applies to with a non-zero scale
    components: tuple[str, ...]


def block_weights(family_key: str | None, spec: Any, config: Any) -> BlockWeights:
    """A per-block transformer spec -> BlockWeights, checked against the model's block counts (its
    config); a BuildError names every problem (a hub base is only checked here, once loaded)."""
    family = get_family(family_key)
    if family is None:
        raise BuildError("per-block transformer weights need the base's family")
    weights, problems = parse_block_weights(family, spec)
    if weights is not None:
        problems = check_block_counts(weights, block_counts_from_config(family, dict(config)))
    if weights is None or problems:
        raise BuildError("per-block transformer weights: " + "; ".join(p.message for p in problems))
    return weights


def _set_block_scales(pipe: Any, family_key: str | None, specs: dict[tuple[str, str], Any]) -> None:
    """Each module's PEFT scaling = its block's weight × alpha / r (``set_scale``, as set_adapters
    sets a scalar weight), for the (adapter, denoiser) pairs with per-block weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ...families.blocks import module_weight

    family = get_family(family_key)
    assert family is not None
    for component in dict.fromkeys(c for _, c in specs):
        model = getattr(pipe, component)
        parsed = {
            adapter: block_weights(family_key, spec, model.config)
            for (adapter, where), spec in specs.items()
            if where == component
        }
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                for adapter, weights in parsed.items():
                    if adapter in getattr(module, "lora_A", {}):
                        module.set_scale(adapter, module_weight(family, weights, name))


def apply_mix(
    pipe: Any, adapters: tuple[str, ...], weights: tuple[Any, ...], family: str | None = None
) -> None:
    """``pipe.set_adapters(adapters, adapter_weights=weights)`` with plan weights thawed to dicts.

    Per-block transformer weights (diffusers has none for DiTs; a dict there would be matched by
    substring) go to diffusers as 1.0, then each module's scaling is set from its block, in every
    transformer that has them (Wan 2.2 A14B: ``transformer`` and ``transformer_2``)."""
    thawed = [thaw_weight(w) for w in weights]
    blocks: dict[tuple[str, str], Any] = {}
    for index, (adapter, weight) in enumerate(zip(adapters, thawed, strict=True)):
        if not isinstance(weight, dict):
            continue
        for component in ("transformer", "transformer_2"):
            if isinstance(weight.get(component), dict):
                blocks[(adapter, component)] = weight[component]
                thawed[index] = {**thawed[index], component: 1.0}
    pipe.set_adapters(list(adapters), adapter_weights=thawed)
    if blocks:
        _set_block_scales(pipe, family, blocks)


def _base_name(name: str) -> str:
    return name.replace(".base_layer", "")


def _fingerprints(model: Any) -> dict[str, tuple[float, float]]:
    import torch

    out = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                continue
            data = param.detach().to(torch.float64)
            out[_base_name(name)] = (float(data.sum()), float((data * data).sum()))
    return out


def _expected_targets(model: Any, adapters: tuple[str, ...], lora_scale: float) -> set[str]:
    """Base weights that must change: LoRA layers of fused adapters with non-zero scale and factors."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets: set[str] = set()
    if lora_scale == 0:
        return targets
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for adapter in adapters:
            if adapter in getattr(module, "lora_A", {}) and module.scaling.get(adapter, 0) != 0:
                a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                if bool(a.abs().sum() > 0) and bool(b.abs().sum() > 0):
                    targets.add(f"{name}.weight")
    return targets


def fuse_adapters(
    pipe: Any,
    step: FuseAdapters,
    family: str | None = None,
    lycoris: Mapping[str, LycorisAdapter] | None = None,
) -> FuseReport:
    """Fuse the step's adapters with its weights and lora_scale, check, and unload all LoRA layers.

    LyCORIS/DoRA adapters (``lycoris``: applied by lorarecipe, not PEFT) change the weights first, in
    fuse order (``pipeline.lycoris``); then ``fuse_lora`` adds the LoRA terms on top."""
    lycoris = lycoris or {}
    own = [(lycoris[n], w) for n, w in zip(step.adapters, step.weights, strict=True) if n in lycoris]
    changed = expected = 0
    touched: set[str] = set()
    if own:
        terms = delta_terms(own, step.lora_scale, get_family(family), step.components)
        changed, expected = apply_terms(pipe, terms)
        touched = {component for component, _ in terms}
    loras = [(n, w) for n, w in zip(step.adapters, step.weights, strict=True) if n not in lycoris]
    if not loras:
        if lora_components(pipe):
            pipe.unload_lora_weights()
        return FuseReport(changed, expected, tuple(sorted(touched)))
    lora_step = dataclasses.replace(
        step, adapters=tuple(n for n, _ in loras), weights=tuple(w for _, w in loras)
    )
    report = _fuse_loras(pipe, lora_step, family)
    components = tuple(sorted(set(report.components) | touched))
    return FuseReport(report.changed + changed, report.expected + expected, components)


def _fuse_loras(pipe: Any, step: FuseAdapters, family: str | None) -> FuseReport:
    """``set_adapters`` + ``fuse_lora`` of plain LoRAs, the post-fuse check, and the unload."""
    import torch

    apply_mix(pipe, step.adapters, step.weights, family)
    available = lora_components(pipe)
    components = [c for c in (step.components or available) if c in available]
    if not components:
        raise BuildError("none of the requested components carries a LoRA adapter: nothing to fuse")
    before = {c: _fingerprints(getattr(pipe, c)) for c in components}
    expected = {c: _expected_targets(getattr(pipe, c), step.adapters, step.lora_scale) for c in components}
    pipe.fuse_lora(
        components=components, lora_scale=step.lora_scale, adapter_names=list(step.adapters), safe_fusing=True
    )
    changed_total = expected_total = 0
    for comp in components:
        model = getattr(pipe, comp)
        after = _fingerprints(model)
        changed = {n for n, fp in after.items() if before[comp].get(n) != fp}
        unexpected = sorted(changed - expected[comp])
        missed = sorted(expected[comp] - changed)
        if unexpected:
            raise BuildError(
                f"fuse changed {len(unexpected)} weights of {comp} that no fused adapter targets: "
                f"{', '.join(unexpected[:5])}"
            )
        if missed:
            raise BuildError(
                f"fuse left {len(missed)} weights of {comp} unchanged although a fused adapter "
                f"applies to them: {', '.join(missed[:5])}"
            )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if _base_name(name) in changed and not bool(torch.isfinite(param).all()):
                    raise BuildError(f"fused weight {comp}.{_base_name(name)} contains NaN/Inf")
        changed_total += len(changed)
        expected_total += len(expected[comp])
    pipe.unload_lora_weights()
    return FuseReport(changed_total, expected_total, tuple(components))
