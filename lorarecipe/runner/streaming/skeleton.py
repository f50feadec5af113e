"""A weightless pipeline that carries only the LoRA layers: what the streaming fuser asks diffusers and PEFT.

Config folder + LoRA files + plan steps -> the fused adapters' LoRA factors as PEFT holds them, and
for every base weight a fused adapter applies to, its terms (``FuseTarget``, cross-checked against
PEFT's scalings and merge order). The LoRA-loadable components are built from their
configs on the meta device, and every parameter is replaced by a zero-stride CPU stub of the right
shape (no memory), so diffusers and PEFT run unchanged on it: ``load_lora_weights`` (diffusers'
``lora_state_dict`` conversion of PEFT/kohya/old layouts, ranks, alphas, alpha/rank patterns),
lorarecipe's own ``load_adapter`` checks and attention-processor conversion (the pipeline executor's
own functions, run on the skeleton), ``add_weighted_adapter``
merges (same module order, hence the same DARE draws for the same seed), ``set_adapters`` with
per-block weights, and fuse_lora's ``scale_layer(lora_scale)``. Only the final ``W + Σ delta`` is
left to the caller, tensor by tensor. The stubs are float32, so the LoRA factors and merges are float32
as on a float32 pipeline. Never loads a base weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import BuildError, StreamingUnsupported
from ...families import FAMILIES
from ...inspect.base_model import check_model_index
from ...plan import FuseAdapters, LoadAdapter, MergeAdapters, Plan
from ..fuse_math import FuseTarget, LoraFactor
from .factors import factors_from_model, fuse_block_weights, resolvable_weights, targets_from_factors

__all__ = ["LORA_MIXINS", "Architecture", "build_skeleton", "fuse_targets", "lora_mixin", "prepare_adapters"]


@dataclass(frozen=True)
class Architecture:
    """Each component's state-dict shapes, config and library ("diffusers" | "transformers"): what
    the output file layouts need (taken before any LoRA layer is injected: PEFT renames ``x.weight``
    to ``x.base_layer.weight``). Plain JSON-able data, so the factor cache can keep it."""

    shapes: dict[str, dict[str, tuple[int, ...]]]
    configs: dict[str, dict[str, Any]]
    libraries: dict[str, str]


@dataclass
class Skeleton:
    """The weightless pipeline and its components' architecture."""

    pipe: Any
    arch: Architecture


# pipeline class -> its LoRA loader mixin in diffusers.loaders.lora_pipeline (the family tables'), so
# the (slow) pipeline modules need not be imported; tests/test_streaming.py checks each against the
# class's MRO.
LORA_MIXINS = {cls: family.lora_mixin for family in FAMILIES.values() for cls in family.pipeline_classes}


def lora_mixin(pipeline_class: str) -> type:
    """The LoRA loader mixin a diffusers pipeline class inherits ``load_lora_weights`` from."""
    import diffusers
    from diffusers.loaders import lora_pipeline

    if pipeline_class in LORA_MIXINS:
        mixin: type = getattr(lora_pipeline, LORA_MIXINS[pipeline_class])
        return mixin
    from diffusers import DiffusionPipeline
    from diffusers.loaders.lora_base import LoraBaseMixin

    pipeline_cls = getattr(diffusers, pipeline_class, None)
    if not isinstance(pipeline_cls, type):
        raise BuildError(f"unknown diffusers pipeline class {pipeline_class!r}")
    for cls in pipeline_cls.__mro__:
        if (
            issubclass(cls, LoraBaseMixin)
            and not issubclass(cls, DiffusionPipeline)
            and "load_lora_weights" in vars(cls)
        ):
            return cls
    raise StreamingUnsupported(f"{pipeline_class} has no LoRA loader; the streaming fuser cannot run it")


def _stub_tensors(model: Any) -> None:
    """Meta parameters/buffers -> zero-stride float32 CPU stubs: real shapes, a few bytes each.

    PEFT moves a new LoRA layer to the device and dtype of its base weight; on meta it would be lost.
    """
    import torch

    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, value in list(table.items()):
                if value is None:
                    continue
                dtype = torch.float32 if value.dtype.is_floating_point else value.dtype
                stub = torch.zeros((), dtype=dtype).expand(value.shape)
                table[name] = (
                    torch.nn.Parameter(stub, requires_grad=False) if table is module._parameters else stub
                )


def _instantiate(library: str, class_name: str, folder: Path) -> tuple[Any, dict[str, Any]]:
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    cls = getattr(diffusers if library == "diffusers" else transformers, class_name, None)
    if cls is None:
        raise BuildError(f"{folder}: unknown {library} class {class_name!r}")
    with init_empty_weights(include_buffers=True):
        if library == "diffusers":
            config = dict(cls.load_config(str(folder)))
            model = cls.from_config(config)
        else:
            loaded = cls.config_class.from_pretrained(str(folder))
            config = loaded.to_dict()
            model = cls._from_config(loaded)
    return model, config


def build_skeleton(config_root: Path, pipeline_class: str | None, extra: Iterable[str] = ()) -> Skeleton:
    """Instantiate the LoRA-loadable components (and ``extra`` ones, e.g. the VAE for a single-file
    layout) of the pipeline described by ``config_root/model_index.json``, without weights."""
    index = check_model_index(config_root)
    mixin = lora_mixin(pipeline_class or index["_class_name"])
    skeleton_cls = type(f"Streaming{mixin.__name__}", (mixin,), {"hf_device_map": None, "components": {}})
    pipe = skeleton_cls()
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    configs: dict[str, dict[str, Any]] = {}
    libraries: dict[str, str] = {}
    wanted = [*getattr(mixin, "_lora_loadable_modules", []), *extra]
    for component in dict.fromkeys(wanted):
        entry = index.get(component)
        if not (isinstance(entry, list) and entry[0] is not None and entry[1] is not None):
            continue
        model, configs[component] = _instantiate(entry[0], entry[1], config_root / component)
        libraries[component] = entry[0]
        # a tied weight is stored once, under its first name (T5's shared.weight, not its
        # encoder.embed_tokens.weight: Chroma's text encoder is T5 and LoRA-loadable)
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - dict(
            model.named_parameters()
        ).keys()
        shapes[component] = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
        _stub_tensors(model)
        setattr(pipe, component, model)
    return Skeleton(pipe, Architecture(shapes, configs, libraries))


def needed_adapters(plan: Plan, fuse: FuseAdapters) -> tuple[list[LoadAdapter], list[MergeAdapters]]:
    """The LoadAdapter and MergeAdapters steps the fused adapters are made of, in plan order (not the
    other adapters of the mix the fuse takes its weights from)."""
    by_name = {s.name: s.id for s in plan.steps if isinstance(s, (LoadAdapter, MergeAdapters))}
    needed = plan.dependencies(*(by_name[name] for name in fuse.adapters))
    loads = [s for s in needed if isinstance(s, LoadAdapter)]
    return loads, [s for s in needed if isinstance(s, MergeAdapters)]


def prepare_adapters(
    skeleton: Skeleton, plan: Plan, fuse: FuseAdapters, adapter_paths: Mapping[str, Path]
) -> None:
    """Load the adapters and run the merges the fuse needs, exactly as the pipeline route does."""
    from ..pipeline.adapters import load_adapter
    from ..pipeline.merge import merge_adapters

    loads, merges = needed_adapters(plan, fuse)
    for step in loads:
        if step.name not in adapter_paths:
            raise BuildError(f"no file for adapter {step.name!r}")
        load_adapter(skeleton.pipe, step.name, Path(adapter_paths[step.name]), plan.family, step.load_into)
    for merge in merges:
        merge_adapters(skeleton.pipe, merge)


def fuse_targets(
    skeleton: Skeleton, fuse: FuseAdapters, family: str | None = None
) -> tuple[dict[tuple[str, str], FuseTarget], dict[str, dict[tuple[str, str], LoraFactor]]]:
    """The fused adapters' factors, and the targets computed from them; cross-checked against what
    diffusers and PEFT do on the skeleton (``set_adapters`` — for per-block transformer weights the
    pipeline route's per-module ``set_scale`` —, ``scale_layer(lora_scale)``,
    ``check_adapters_to_merge``): the same modules, adapters in the same order, the same scalings bit
    for bit. UNet block dicts take diffusers' scalings. Refuses what a LoRA delta cannot express."""
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

    from ..pipeline.fuse import apply_mix
    from ..pipeline.merge import lora_components

    pipe = skeleton.pipe
    available = lora_components(pipe)
    components = [c for c in (fuse.components or available) if c in available]
    if not components:
        raise BuildError("none of the requested components carries a LoRA adapter: nothing to fuse")
    factors: dict[str, dict[tuple[str, str], LoraFactor]] = {a: {} for a in fuse.adapters}
    for component in available:  # all of them: the factors are cached per adapter, for any fuse
        for adapter, found in factors_from_model(component, getattr(pipe, component), fuse.adapters).items():
            factors[adapter].update(found)
    apply_mix(pipe, fuse.adapters, fuse.weights, family)
    observed: dict[tuple[str, str, str], float] = {}  # (component, module, adapter) -> PEFT's scaling
    order: dict[tuple[str, str], tuple[str, ...]] = {}  # module -> adapters PEFT merges, in order
    for component in components:
        for name, module in getattr(pipe, component).named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            if fuse.lora_scale != 1.0:
                module.scale_layer(fuse.lora_scale)
            lora_a = getattr(module, "lora_A", {})
            merged = [a for a in check_adapters_to_merge(module, list(fuse.adapters)) if a in lora_a]
            for adapter in merged:
                observed[(component, name, adapter)] = module.scaling[adapter]
            if merged:
                order[(component, name)] = tuple(merged)
    configs = {
        c: dict(getattr(pipe, c).config) for c in ("transformer", "transformer_2") if getattr(pipe, c, None)
    }
    blocks = fuse_block_weights(fuse, family, configs)
    scalings = None if resolvable_weights(fuse) else observed
    targets = targets_from_factors(factors, fuse, scalings, family, blocks)
    ours = {
        (t.component, t.module_name, term.adapter): term.scaling for t in targets.values() for term in t.terms
    }
    if ours != observed or order != {(t.component, t.module_name): t.adapters for t in targets.values()}:
        raise BuildError("internal: the streaming fuser's terms differ from what PEFT would merge")
    return targets, factors
