"""Static checks of the inputs: base and adapters, from safetensors headers and JSON configs only.

Recipe sources -> :class:`InputFacts` (resolved paths, detected family, LoRA formats and ranks) plus
located problems: missing files, pickle, unreadable headers, unsupported LoRA layouts, LoRAs made for
another architecture, modules that do not exist in the base. Hub inputs are checked when they are
already in the local Hugging Face cache, otherwise reported as "unchecked until fetched".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..builtin.catalog import BUILTIN_BASES, BUILTIN_LORAS, builtin_inventory
from ..diagnostics import did_you_mean
from ..errors import LorarecipeError
from ..families import get_family
from ..fs.hubcache import cached_file, cached_snapshot
from ..fs.paths import check_input, resolve_input
from ..inspect import (
    BaseInfo,
    ComponentInfo,
    LoraInfo,
    SafetensorsHeader,
    TensorInfo,
    check_lora_against_base,
    inspect_diffusers_folder,
    inspect_lora,
    inspect_single_file,
    read_header,
)
from ..inspect.base_model import check_model_index
from ..inspect.loaded_as import as_loaded
from ..plan import Check, Source
from ..recipe.load import path_text
from ..recipe.vocabulary import FAMILIES
from .adapter_fit import blocks_of, check_experts, family_mismatch, other_family
from .context import CompileContext
from .difference import check_difference
from .lycoris import check_lycoris_adapter

__all__ = ["AdapterFacts", "InputFacts", "check_inputs"]


@dataclass
class AdapterFacts:
    name: str
    source: Source
    path: Path | None = None
    info: LoraInfo | None = None
    difference: BaseInfo | None = None  # a checkpoint whose difference from the base is the adapter


@dataclass
class InputFacts:
    base_source: Source
    family: str | None
    base_info: BaseInfo | None = None
    base_path: Path | None = None
    config_source: Source | None = None
    adapters: dict[str, AdapterFacts] = field(default_factory=dict)


def _builtin_header(name: str) -> SafetensorsHeader:
    entry = builtin_inventory()["loras"][name]
    tensors: dict[str, TensorInfo] = {}
    offset = 0
    for key, (dtype, shape) in entry["tensors"].items():
        size = 4 if dtype == "F32" else 2
        for dim in shape:
            size *= dim
        tensors[key] = TensorInfo(key, dtype, tuple(shape), offset, offset + size)
        offset += size
    return SafetensorsHeader(
        path=f"builtin:{name}",
        file_size=offset + 8,
        header_size=0,
        tensors=tensors,
        metadata=dict(entry.get("metadata") or {}),
    )


def _builtin_base_info(name: str) -> BaseInfo:
    components: dict[str, ComponentInfo] = {}
    total = largest = 0
    for comp, tensors in builtin_inventory()["bases"][name].items():
        table = {key: (dtype, tuple(shape)) for key, (dtype, shape) in tensors.items()}
        components[comp] = ComponentInfo(name=comp, class_name=None, files=(), tensors=table)
        for dtype, shape in table.values():
            size = 4 if dtype == "F32" else 2
            for dim in shape:
                size *= dim
            total += size
            largest = max(largest, size)
    family = BUILTIN_BASES[name].family
    return BaseInfo(
        kind="diffusers_folder",
        family=family,
        family_evidence=f"built-in {name}",
        pipeline_class=FAMILIES[family].pipeline_class,
        dtype="float32",
        components=components,
        total_bytes=total,
        largest_tensor_bytes=largest,
    )


def _confined(ctx: CompileContext, path: tuple[Any, ...], found: Path, kind: str) -> bool:
    """Whether an input passes the read confinement (reported at ``path`` when it does not)."""
    try:
        check_input(found, kind, ctx.root, ctx.allow_read, path_text(path))
    except LorarecipeError as exc:
        ctx.error(path, exc.message)
        return False
    return True


def _local(ctx: CompileContext, path: tuple[Any, ...], ref: str, want_dir: bool) -> Path | None:
    """Resolve a recipe-relative path; report confinement, absence and file/folder mix-ups."""
    try:
        resolved = resolve_input(ref, ctx.root, ctx.allow_read)
    except LorarecipeError as exc:
        ctx.error(path, exc.message)
        return None
    if not resolved.exists():
        siblings = [p.name for p in resolved.parent.iterdir()] if resolved.parent.is_dir() else []
        hint = did_you_mean(resolved.name, siblings)
        ctx.error(path, f"{'folder' if want_dir else 'file'} not found: {ref}", hint)
        return None
    if want_dir and not resolved.is_dir():
        ctx.error(
            path,
            f"{ref} is a file, but a diffusers folder is expected here",
            "use 'file:' for a single-file checkpoint",
        )
        return None
    if not want_dir and resolved.is_dir():
        ctx.error(
            path,
            f"{ref} is a folder, but a .safetensors file is expected here",
            "name the exact .safetensors file inside it",
        )
        return None
    return resolved if _confined(ctx, path, resolved, "local") else None


def _check_base(ctx: CompileContext) -> InputFacts:
    spec = ctx.recipe.base
    declared = None if spec.family == "auto" else spec.family
    info: BaseInfo | None = None
    base_path: Path | None = None
    config_source = None
    if spec.builtin:
        source = Source("builtin", spec.builtin)
        info = _builtin_base_info(spec.builtin)
        ctx.checks.append(
            Check("base", "ok", f"built-in {spec.builtin} ({BUILTIN_BASES[spec.builtin].description})")
        )
    elif spec.hub:
        source = Source("hub", spec.hub, revision=spec.revision)
        cached = cached_snapshot(spec.hub, spec.revision)
        if cached is None:
            ctx.checks.append(
                Check(
                    "base",
                    "unchecked",
                    f"{source.describe()}: not in the local Hugging Face cache; unchecked until fetched",
                )
            )
        elif _confined(ctx, ("base", "hub"), cached[1], "hub"):
            base_path = cached[1]
            info = _inspect(ctx, ("base", "hub"), lambda: inspect_diffusers_folder(cached[1], spec.variant))
    else:
        key = "path" if spec.path else "file"
        ref = spec.path or spec.file
        source = Source("local", ref)
        base_path = _local(ctx, ("base", key), ref, want_dir=bool(spec.path))
        if base_path is not None:
            if spec.path:
                info = _inspect(ctx, ("base", key), lambda: inspect_diffusers_folder(base_path, spec.variant))
            else:
                info = _inspect(ctx, ("base", key), lambda: inspect_single_file(base_path))
        if spec.config:
            config_source = Source("local", spec.config)
            if "/" in spec.config and not (ctx.root / spec.config).exists():
                config_source = Source("hub", spec.config)
            else:
                config_dir = _local(ctx, ("base", "config"), spec.config, want_dir=True)
                if config_dir is not None and _inspect(
                    ctx, ("base", "config"), lambda: check_model_index(config_dir)
                ):
                    info = _with_config_components(ctx, info, config_dir)
    detected = info.family if info else None
    if declared and detected and declared != detected:
        ctx.error(
            ("base", "family"),
            f"declared family {declared!r} ({FAMILIES[declared].label}) but the files "
            f"are {FAMILIES[detected].label} ({info.family_evidence if info else ''})",
        )
    if spec.file and not spec.config and spec.builtin is None:
        ctx.warn(
            ("base", "file"),
            "a single-file base needs its pipeline configs to load offline",
            "add 'config:' naming a local diffusers folder of the same family",
        )
    family = declared or detected
    if info is not None and spec.builtin is None:
        ctx.checks.append(
            Check(
                "base",
                "ok",
                f"{source.describe()}: {info.pipeline_class or info.kind}, family "
                f"{family or 'unknown'}, dtype {info.dtype or '?'}",
                (
                    ("family", family),
                    ("dtype", info.dtype),
                    ("bytes", info.total_bytes),
                    ("largest_tensor_bytes", info.largest_tensor_bytes),
                ),
            )
        )
    return InputFacts(source, family, info, base_path, config_source)


def _with_config_components(ctx: CompileContext, info: BaseInfo | None, config_dir: Path) -> BaseInfo | None:
    """A single file without some components (FLUX.1's holds the transformer only): the pipeline
    takes the others from the config folder, so the static checks see them there."""
    if info is None:
        return None
    folder = _inspect(ctx, ("base", "config"), lambda: inspect_diffusers_folder(config_dir))
    if folder is None:
        return info
    extra = {k: v for k, v in folder.components.items() if k not in info.components}
    return (
        dataclasses.replace(info, components=MappingProxyType({**info.components, **extra}))
        if extra
        else info
    )


def _inspect(ctx: CompileContext, path: tuple[Any, ...], fn: Any) -> Any:
    try:
        return fn()
    except LorarecipeError as exc:
        ctx.error(path, exc.message)
    except (OSError, ValueError) as exc:
        ctx.error(path, f"cannot read: {exc}")
    return None


def _adapter_header(ctx: CompileContext, name: str, spec: Any, family: str | None) -> AdapterFacts:
    where = ("adapters", name)
    if spec.builtin:
        facts = AdapterFacts(name, Source("builtin", spec.builtin))
        facts.info = inspect_lora(_builtin_header(spec.builtin), family)
        return facts
    if spec.hub:
        facts = AdapterFacts(name, Source("hub", spec.hub, revision=spec.revision, filename=spec.weight_name))
        if not spec.weight_name.endswith(".safetensors"):
            ctx.error(
                (*where, "weight_name"),
                f"{spec.weight_name!r} is not a .safetensors file; lorarecipe "
                "never loads pickle-based weights",
            )
            return facts
        cached = cached_file(spec.hub, spec.weight_name, spec.revision)
        if cached is None:
            ctx.checks.append(
                Check(
                    f"adapters.{name}",
                    "unchecked",
                    f"{facts.source.describe()}: not in the local "
                    "Hugging Face cache; unchecked until fetched",
                )
            )
            return facts
        if not _confined(ctx, (*where, "hub"), cached[1], "hub"):
            return facts
        facts.path = cached[1]
    else:
        facts = AdapterFacts(name, Source("local", spec.file))
        facts.path = _local(ctx, (*where, "file"), spec.file, want_dir=False)
        if facts.path is None:
            return facts
    header = _inspect(ctx, (*where, "hub" if spec.hub else "file"), lambda: read_header(facts.path))
    if header is not None:
        facts.info = _inspect(ctx, where, lambda: inspect_lora(header, family))
    return facts


def _check_adapter(ctx: CompileContext, inputs: InputFacts, name: str, spec: Any) -> None:
    where = ("adapters", name)
    if spec.checkpoint is not None:
        facts = inputs.adapters[name] = AdapterFacts(name, Source("local", spec.checkpoint))
        facts.path = _local(ctx, (*where, "checkpoint"), spec.checkpoint, want_dir=True)
        if facts.path is not None:
            describe = facts.source.describe()
            facts.difference = check_difference(
                ctx, name, facts.path, inputs.base_info, inputs.family, describe
            )
        return
    facts = _adapter_header(ctx, name, spec, inputs.family)
    inputs.adapters[name] = facts
    if not check_experts(ctx, inputs, name, spec):
        facts.info = None
        return
    if facts.info is not None:
        facts.info = as_loaded(facts.info, get_family(inputs.family), spec.load_into)
    info = facts.info
    if (
        spec.builtin
        and ctx.recipe.base.builtin
        and BUILTIN_LORAS[spec.builtin].base != ctx.recipe.base.builtin
    ):
        ctx.error(
            (*where, "builtin"),
            f"built-in LoRA {spec.builtin} was made for {BUILTIN_LORAS[spec.builtin].base}, "
            f"but the base is {ctx.recipe.base.builtin}",
        )
        return
    if info is None:
        return
    if info.unsupported and other_family(info, inputs):
        ctx.error(where, family_mismatch(info, inputs), on_key=True)  # the more basic problem
        return
    if info.lycoris is not None:  # LyCORIS/DoRA: applied by lorarecipe, checked on its own terms
        named = {"diffusers": ("peft", "diffusers"), "peft": ("peft", "diffusers"), "kohya": ("kohya",)}
        layouts = sorted({m.layout for m in info.lycoris.modules})
        if spec.format in named and not set(layouts) <= set(named[spec.format]):
            ctx.error(
                (*where, "format"),
                f"declared format {spec.format!r} but the file's modules are in {', '.join(layouts)} layout",
                "remove 'format' to detect it",
            )
        describe = facts.source.describe()
        check_lycoris_adapter(ctx, name, spec, info.lycoris, inputs.base_info, inputs.family, describe)
        return
    if spec.scale_convention is not None:
        ctx.error(
            (*where, "scale_convention"),
            "scale_convention applies to LyCORIS LoKr files; this is a plain LoRA (scale alpha/rank)",
        )
    if info.unsupported:
        ctx.error(where, f"cannot load this LoRA: {info.unsupported}", on_key=True)
        return
    declared = {"diffusers": "peft", "peft": "peft", "kohya": "kohya"}.get(spec.format)
    detected = "peft" if info.format in ("peft", "diffusers_old", "attn_procs") else info.format
    if declared and detected != declared:
        ctx.error(
            (*where, "format"),
            f"declared format {spec.format!r} but the file is in {info.format} layout",
            "remove 'format' to detect it",
        )
    if info.unrecognized_keys:
        shown = ", ".join(info.unrecognized_keys[:5])
        more = f" and {len(info.unrecognized_keys) - 5} more" if len(info.unrecognized_keys) > 5 else ""
        ctx.error(
            where,
            f"{len(info.unrecognized_keys)} tensors of the file belong to no LoRA module and would "
            f"be dropped: {shown}{more}",
            on_key=True,
        )
    compat_ok = True
    if inputs.base_info is not None:
        report = check_lora_against_base(info, inputs.base_info)
        if report.unchecked_components:
            ctx.checks.append(
                Check(
                    f"adapters.{name}",
                    "unchecked",
                    f"{', '.join(report.unchecked_components)} "
                    "module names cannot be matched to the base statically (checked when loaded)",
                )
            )
        if report.family_conflict:
            ctx.error(where, report.family_conflict, on_key=True)
            compat_ok = False
        elif report.checked and (report.missing or report.shape_mismatches):
            compat_ok = False
            detail = "; ".join(
                [*report.shape_mismatches[:3], *(f"no module {m}" for m in report.missing[:3])]
            )
            ctx.error(
                where,
                f"{len(report.missing) + len(report.shape_mismatches)} of {report.total} LoRA modules "
                f"do not fit the base ({detail})",
                "is this LoRA made for another base model?",
                on_key=True,
            )
    elif other_family(info, inputs):
        ctx.error(where, family_mismatch(info, inputs), on_key=True)
        compat_ok = False
    if compat_ok:
        blocks, fused = blocks_of(info, inputs.family)
        ctx.checks.append(
            Check(
                f"adapters.{name}",
                "ok",
                f"{facts.source.describe()}: {info.format}, {len(info.modules)} modules in "
                f"{', '.join(info.components)}, rank {'/'.join(map(str, info.ranks))}"
                + (f"; {blocks}" if blocks else "")
                + (
                    f"; {fused} fused original-layout modules, each split into its diffusers modules"
                    if fused
                    else ""
                ),
                (
                    ("format", info.format),
                    ("modules", len(info.modules)),
                    ("components", info.components),
                    ("ranks", info.ranks),
                    ("family", info.family),
                    *((("blocks", blocks), ("fused_modules", fused)) if blocks else ()),
                ),
            )
        )


def check_inputs(ctx: CompileContext) -> InputFacts:
    """Check the base and every adapter; returns what was learned from their headers."""
    inputs = _check_base(ctx)
    for name, spec in ctx.recipe.adapters.items():
        _check_adapter(ctx, inputs, name, spec)
    return inputs


def component_ranks(info: LoraInfo) -> dict[str, tuple[int, ...]]:
    """Distinct ranks per component of a LoRA (PEFT compares ranks per component model)."""
    ranks: dict[str, set[int]] = {}
    for module in info.modules:
        ranks.setdefault(module.component, set()).add(module.rank)
    return {comp: tuple(sorted(r)) for comp, r in ranks.items()}
