"""LoRA factors per base weight, as diffusers and PEFT loaded them, and the fuse targets made of them.

Adapter factors (per module: ``lora_A``, ``lora_B``, alpha, rank, rsLoRA, layer kind) + the
FuseAdapters step -> for each base weight a fused adapter applies to, the terms ``scaling · ΔW`` in
fuse order (``FuseTarget``). Each module's weight is its adapter's: a number, its component's, or
for per-block transformer weights its block's (``families.blocks``); only diffusers' UNet block
dicts need diffusers to expand them. The factors come from a weightless pipeline on which diffusers and PEFT
ran (``skeleton``), or from the factor cache (``factor_cache``); the arithmetic on them is
:mod:`lorarecipe.runner.fuse_math`'s. Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ...errors import BuildError, StreamingUnsupported
from ...families import get_family
from ...families.blocks import BlockWeights, module_weight
from ...plan import FuseAdapters, thaw_weight
from ..fuse_math import FuseTarget, FuseTerm, LayerKind, LoraFactor, native_scaling

__all__ = [
    "block_specs",
    "factors_from_model",
    "fuse_block_weights",
    "resolvable_weights",
    "targets_from_factors",
]

ModuleKey = tuple[str, str]  # (component, module name)


def resolvable_weights(fuse: FuseAdapters) -> bool:
    """Whether every module's weight follows from the plan alone: numbers, per-component numbers and
    per-block transformer weights, but not diffusers' UNet block dicts (diffusers expands those)."""
    for weight in fuse.weights:
        thawed = thaw_weight(weight)
        if isinstance(thawed, dict) and isinstance(thawed.get("unet"), dict):
            return False
    return True


def block_specs(fuse: FuseAdapters) -> dict[tuple[str, str], Any]:
    """The fused adapters' per-block transformer specs: (adapter, transformer component) -> spec."""
    out: dict[tuple[str, str], Any] = {}
    for adapter, frozen in zip(fuse.adapters, fuse.weights, strict=True):
        weight = thaw_weight(frozen)
        for component in ("transformer", "transformer_2"):
            if isinstance(weight, dict) and isinstance(weight.get(component), dict):
                out[(adapter, component)] = weight[component]
    return out


def fuse_block_weights(
    fuse: FuseAdapters, family: str | None, configs: Mapping[str, Mapping[str, Any]]
) -> dict[tuple[str, str], BlockWeights]:
    """The fused adapters' per-block transformer specs, parsed and checked against each denoiser's
    config (its block counts; ``configs``: component -> config): (adapter, component) -> BlockWeights."""
    from ..pipeline.fuse import block_weights

    return {
        (adapter, component): block_weights(family, spec, configs.get(component, {}))
        for (adapter, component), spec in block_specs(fuse).items()
    }


def _weight_of(
    weight: Any, component: str, module: str, family: str | None, blocks: BlockWeights | None
) -> float:
    """One adapter's weight on one module (``blocks``: the adapter's parsed per-block spec for this
    component, if any)."""
    if not isinstance(weight, dict):
        return float(weight)
    value = weight.get(component, 1.0)
    if isinstance(value, dict):
        known = get_family(family)
        assert known is not None and blocks is not None
        return module_weight(known, blocks, module)
    return float(value)


def _kind(where: str, module: Any) -> LayerKind:
    import torch

    layer = module.get_base_layer()
    if isinstance(layer, torch.nn.Linear) and not getattr(module, "fan_in_fan_out", False):
        return LayerKind.LINEAR
    if isinstance(layer, torch.nn.Conv2d) and layer.groups == 1:
        return LayerKind.CONV1X1 if tuple(layer.weight.shape[2:4]) == (1, 1) else LayerKind.CONV
    raise StreamingUnsupported(
        f"{where}: a LoRA on a {type(layer).__name__} layer; the streaming fuser only fuses Linear and "
        "Conv2d layers (use --executor diffusers)"
    )


def factors_from_model(
    component: str, model: Any, adapters: Iterable[str]
) -> dict[str, dict[ModuleKey, LoraFactor]]:
    """The factors of ``adapters`` on every PEFT layer of ``model`` (a component of the skeleton).

    Refuses what a LoRA delta cannot express: a LoRA bias, a DoRA magnitude, a non-LoRA layer
    (LoKr/LoHa), a layer other than Linear/Conv2d.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    wanted = list(adapters)
    out: dict[str, dict[ModuleKey, LoraFactor]] = {a: {} for a in wanted}
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        where = f"{component}.{name}"
        lora_a = getattr(module, "lora_A", {})
        for adapter in wanted:
            if adapter not in lora_a:
                if any(adapter in getattr(module, n, {}) for n in module.adapter_layer_names):
                    raise StreamingUnsupported(
                        f"{where}: adapter {adapter!r} is not a plain LoRA layer ({type(module).__name__}); "
                        "the streaming fuser only fuses plain LoRA (use --executor diffusers)"
                    )
                continue
            if getattr(module, "lora_bias", {}).get(adapter) or adapter in getattr(
                module, "lora_variant", {}
            ):
                raise StreamingUnsupported(
                    f"{where}: adapter {adapter!r} has a LoRA bias or a DoRA magnitude; the streaming "
                    "fuser only fuses plain LoRA (use --executor diffusers)"
                )
            out[adapter][(component, name)] = LoraFactor(
                a=module.lora_A[adapter].weight.detach().float(),
                b=module.lora_B[adapter].weight.detach().float(),
                alpha=module.lora_alpha[adapter],
                r=int(module.r[adapter]),
                rslora=bool(module.use_rslora.get(adapter, False)),
                kind=_kind(where, module),
            )
    return out


def targets_from_factors(
    factors: Mapping[str, Mapping[ModuleKey, LoraFactor]],
    fuse: FuseAdapters,
    scalings: Mapping[tuple[str, str, str], float] | None = None,
    family: str | None = None,
    blocks: Mapping[tuple[str, str], BlockWeights] | None = None,
) -> dict[tuple[str, str], FuseTarget]:
    """{(component, base weight key): target} for ``fuse``: each fused adapter's terms in fuse order.

    Scalings are computed (``native_scaling`` of each module's weight; ``blocks``: the parsed
    per-block spec of each (adapter, transformer) that has one, checked against the model) unless given
    per (component, module, adapter), which the skeleton route does for UNet block dicts.
    """
    terms: dict[ModuleKey, list[FuseTerm]] = {}
    for adapter, frozen in zip(fuse.adapters, fuse.weights, strict=True):
        if adapter not in factors:
            raise BuildError(f"no LoRA factors for adapter {adapter!r}")
        weight = thaw_weight(frozen)
        for (component, module), factor in factors[adapter].items():
            if fuse.components and component not in fuse.components:
                continue
            if scalings is not None:
                scaling = scalings[(component, module, adapter)]
            else:
                parsed = (blocks or {}).get((adapter, component))
                module_weight_ = _weight_of(weight, component, module, family, parsed)
                scaling = native_scaling(factor, module_weight_, fuse.lora_scale)
            terms.setdefault((component, module), []).append(FuseTerm(adapter, factor, scaling))
    if not terms:
        raise BuildError("none of the requested components carries a LoRA adapter: nothing to fuse")
    return {
        (component, f"{module}.weight"): FuseTarget(component, module, tuple(found))
        for (component, module), found in terms.items()
    }
