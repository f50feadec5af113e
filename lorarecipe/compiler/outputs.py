"""Checks of the ``outputs`` section: what each output needs, and where it may be written.

Recipe outputs -> located problems. Paths must stay inside the output root and must not collide
(two outputs at one path, or one inside another's folder, which an atomic folder replace would
destroy). Checkpoint outputs need a ``fuse``; grids need the variants they show. In a family with two
experts (Wan 2.2 A14B) a single file or a LoRA file holds one expert (``component``), every fused
expert must be written by some output, and a grid of a video family takes ``frames``.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from ..diagnostics import did_you_mean
from ..families import needs_input_image
from ..fs.paths import normalize_output_path
from ..recipe.models import GridOutput, LoraOutput, PipelineOutput, SingleFileOutput
from ..recipe.vocabulary import FAMILIES, RESERVED_VARIANTS, FamilyInfo
from .context import CompileContext
from .inputs import InputFacts
from .references import adapter_components

__all__ = ["check_outputs", "default_weight_name", "lora_component"]


def default_weight_name(spec: LoraOutput) -> str:
    if spec.weight_name:
        return spec.weight_name
    return "pytorch_lora_weights.safetensors" if spec.layout == "diffusers" else f"{spec.adapter}.safetensors"


def _claims(spec: object, norm: str) -> list[str]:
    """Every path an output writes: a grid also writes ``<stem>.json`` and ``<stem>_cells/``."""
    if isinstance(spec, GridOutput):
        stem = str(PurePosixPath(norm).with_suffix(""))
        return [norm, f"{stem}.json", f"{stem}_cells"]
    return [norm]


def _check_paths(ctx: CompileContext) -> dict[str, str]:
    normalized: dict[str, str] = {}
    for name, spec in ctx.recipe.outputs.items():
        try:
            normalized[name] = normalize_output_path(spec.path)
        except ValueError as exc:
            ctx.error(("outputs", name, "path"), str(exc))
    seen: list[tuple[PurePosixPath, str]] = []
    for name, norm in normalized.items():
        mine = [
            PurePosixPath(p.lower()) for p in _claims(ctx.recipe.outputs[name], norm)
        ]  # case-insensitive FS too
        for a in mine:
            for b, other in seen:
                if other == name:
                    continue
                if a == b:
                    ctx.error(
                        ("outputs", name, "path"), f"output path {norm!r} collides with outputs.{other}"
                    )
                elif b in a.parents or a in b.parents:
                    inner, outer = (name, other) if b in a.parents else (other, name)
                    ctx.error(
                        ("outputs", name, "path"),
                        f"outputs.{inner} would be written inside outputs.{outer} "
                        f"({norm!r}), which is replaced as a whole",
                        "give each output its own path",
                    )
        seen.extend((a, name) for a in mine)
    return normalized


def _check_grid(ctx: CompileContext, name: str, spec: GridOutput, family: str | None) -> None:
    names = set(ctx.recipe.adapters) | set(ctx.recipe.merges)
    where = ("outputs", name)
    for i, variant in enumerate(spec.variants):
        if variant == "mix" and ctx.recipe.set_adapters is None:
            ctx.error((*where, "variants", i), "variant 'mix' needs a 'set_adapters' section")
        elif variant == "fused" and ctx.recipe.fuse is None:
            ctx.error((*where, "variants", i), "variant 'fused' needs a 'fuse' section")
        elif variant not in RESERVED_VARIANTS and variant not in names:
            choices = [*RESERVED_VARIANTS, *sorted(names)]
            ctx.error(
                (*where, "variants", i),
                f"unknown variant {variant!r}",
                did_you_mean(variant, choices) or f"variants: {', '.join(choices)}",
            )
    if spec.sweep is not None:
        if spec.sweep.adapter is not None:
            if spec.sweep.adapter not in names:
                ctx.error(
                    (*where, "sweep", "adapter"),
                    f"unknown adapter {spec.sweep.adapter!r}",
                    did_you_mean(spec.sweep.adapter, names),
                )
        elif ctx.recipe.set_adapters is None and ctx.recipe.fuse is None:
            ctx.error(
                (*where, "sweep", "lora_scale"), "a lora_scale sweep needs a 'set_adapters' mix or a 'fuse'"
            )
    cells = (
        len(spec.prompts)
        * len(spec.seeds)
        * len(spec.variants)
        * (len(spec.sweep.weights or spec.sweep.lora_scale or [1]) if spec.sweep else 1)
    )
    if cells > 1024:
        ctx.error(
            where,
            f"the grid has {cells} images (limit: 1024 per grid)",
            "use fewer prompts, seeds, variants or sweep values",
            on_key=True,
        )
    known = FAMILIES.get(family or "")
    if known is not None and not known.grid.frames and spec.frames is not None:
        ctx.error((*where, "frames"), f"{known.label} makes images, not videos", "remove frames", on_key=True)
    sizes = [spec.size] if isinstance(spec.size, int) else (spec.size or [])
    if known is not None and known.grid.frames and any(size % 16 for size in sizes):
        ctx.error(  # WanPipeline.check_inputs raises otherwise (8× VAE, 2×2 patches)
            (*where, "size"), f"{known.label} renders sizes that are multiples of 16, got {spec.size}"
        )
    if known is not None and known.grid.negative_prompt == "none" and spec.negative_prompt:
        ctx.error(
            (*where, "negative_prompt"),
            f"{known.label} pipelines take no negative prompt",
            "remove negative_prompt",
            on_key=True,
        )
    if known is not None and known.grid.negative_prompt != "true_cfg" and spec.true_cfg_scale is not None:
        ctx.error(
            (*where, "true_cfg_scale"),
            f"{known.label} always uses classifier-free guidance: set 'guidance' instead"
            if known.grid.negative_prompt == "native"
            else f"{known.label} pipelines have no true_cfg_scale: 'guidance' is {known.grid.guidance}",
            on_key=True,
        )
    distilled = known is not None and known.grid.negative_prompt == "true_cfg"
    if known is not None and distilled and spec.negative_prompt and spec.true_cfg_scale is None:
        ctx.error(
            (*where, "negative_prompt"),
            f"{known.label} is guidance-distilled: it has no negative prompt without true CFG",
            "add true_cfg_scale (> 1, e.g. 4.0: two passes per step), or remove negative_prompt",
            on_key=True,
        )
    if family is None and spec.size is None and ctx.recipe.base.builtin is None:
        ctx.warn((*where, "size"), "image size will be the pipeline's default (family unknown until fetched)")


def _check_grid_pipeline(
    ctx: CompileContext, name: str, family: str | None, pipeline_class: str | None
) -> None:
    """Grids call text-to-image/video pipelines: an edit pipeline (Qwen-Image-Edit) or an image-to-video
    one (Wan I2V) needs an input image."""
    known = needs_input_image(pipeline_class, family)
    if known is not None:
        use, model = known.image_input_use
        ctx.error(
            ("outputs", name, "kind"),
            f"the base is a {pipeline_class}, which {use}: grids render from prompts only",
            f"build the fused pipeline and LoRA files here, and sample {model} with its own images",
        )


def _single_file_problem(family: str, fused: set[str] | None) -> tuple[str, str] | None:
    info = FAMILIES[family]
    if not info.single_file:
        supported = ", ".join(f.label for f in FAMILIES.values() if f.single_file)
        return (
            f"single-file checkpoints are supported for {supported}, not {info.label}",
            "use kind: pipeline",
        )
    lost = sorted((fused or set()) - set(info.single_file_components) - set(info.experts))
    if lost:
        holds = ", ".join(info.single_file_components)
        return (
            f"a {info.label} single file holds the {holds} only (as the original checkpoint does), but the "
            f"fuse also changes {', '.join(lost)}",
            f"set fuse.components: [{holds}], or write the fused {', '.join(lost)} with kind: pipeline",
        )
    return None


def lora_component(ctx: CompileContext, spec: LoraOutput, inputs: InputFacts) -> str | None:
    """The expert a LoRA output writes: the recipe's ``component``, else the adapter's only expert; None
    for a family with one denoiser (or when the LoRA headers are not available yet)."""
    info = FAMILIES.get(inputs.family or "")
    if spec.component is not None or info is None or not info.experts:
        return spec.component
    loaded = adapter_components(ctx, inputs, spec.adapter) or set()
    experts = [e for e in info.experts if e in loaded]
    return experts[0] if len(experts) == 1 else None


def _check_experts(ctx: CompileContext, inputs: InputFacts, info: FamilyInfo, fused: set[str] | None) -> None:
    """Families with two experts: each output's ``component`` is an expert the base has (and a LoRA
    output's one its adapter is loaded into), and every fused expert is written by some output."""
    base = inputs.base_info
    present = [e for e in info.experts if base is None or e in base.components]
    written: set[str] = set()
    for name, spec in ctx.recipe.outputs.items():
        component = getattr(spec, "component", None)
        if isinstance(spec, PipelineOutput):
            written |= set(info.experts)
        elif isinstance(spec, SingleFileOutput):
            written.add(component or info.denoiser)
        if component is not None and component not in present:
            ctx.error(
                ("outputs", name, "component"),
                f"the base has no {component} (its denoisers: {', '.join(present)})",
            )
        if isinstance(spec, LoraOutput):
            loaded = adapter_components(ctx, inputs, spec.adapter)
            experts = sorted(set(info.experts) & (loaded or set()))
            if component is not None and loaded is not None and component not in loaded:
                ctx.error(
                    ("outputs", name, "component"),
                    f"{spec.adapter!r} is not loaded into {component} (only {', '.join(experts) or 'none'})",
                )
            elif component is None and len(experts) > 1:
                ctx.error(
                    ("outputs", name),
                    f"{spec.adapter!r} is loaded into both experts ({', '.join(experts)}) and a LoRA file "
                    "holds one (diffusers loads one file into one expert at a time)",
                    "add component: transformer or component: transformer_2 (one output per expert)",
                    on_key=True,
                )
    missed = sorted((fused or set()) & set(info.experts) - written)
    single = [n for n, s in ctx.recipe.outputs.items() if isinstance(s, SingleFileOutput)]
    if missed and single:
        ctx.error(
            ("outputs", single[0], "kind"),
            f"the fuse changes {', '.join(missed)}, but no output writes it (a single file holds one expert)",
            f"add a single_file output with component: {missed[0]}, or a pipeline output",
        )


def check_outputs(ctx: CompileContext, inputs: InputFacts, fused: set[str] | None = None) -> dict[str, str]:
    """Check every output; returns output name -> normalized relative path. ``fused``: the components
    the fuse changes, when the LoRA headers tell."""
    family = inputs.family
    pipeline_class = inputs.base_info.pipeline_class if inputs.base_info is not None else None
    normalized = _check_paths(ctx)
    names = set(ctx.recipe.adapters) | set(ctx.recipe.merges)
    known = FAMILIES.get(family or "")
    if known is not None and known.experts:
        _check_experts(ctx, inputs, known, fused)
    for name, spec in ctx.recipe.outputs.items():
        if getattr(spec, "component", None) is not None and known is not None and not known.experts:
            ctx.error(
                ("outputs", name, "component"),
                f"{known.label} has one denoiser; 'component' is for families with two experts "
                "(Wan 2.2 A14B)",
                "remove component",
                on_key=True,
            )
    for name, spec in ctx.recipe.outputs.items():
        where = ("outputs", name)
        if isinstance(spec, (PipelineOutput, SingleFileOutput)) and ctx.recipe.fuse is None:
            ctx.error(
                (*where, "kind"),
                f"a {spec.kind} output saves the fused checkpoint, but the recipe has no 'fuse' section",
                "add 'fuse:' (with adapters and lora_scale) or remove this output",
            )
        problem = _single_file_problem(family, fused) if family is not None else None
        if isinstance(spec, SingleFileOutput) and problem is not None:
            ctx.error((*where, "kind"), problem[0], problem[1])
        if isinstance(spec, LoraOutput):
            if spec.adapter not in names:
                ctx.error(
                    (*where, "adapter"),
                    f"unknown adapter {spec.adapter!r}",
                    did_you_mean(spec.adapter, names) or f"known: {', '.join(sorted(names))}",
                )
            info = FAMILIES.get(family or "")
            if spec.layout == "kohya" and info is not None and not info.kohya_prefixes:
                writable = ", ".join(f.label for f in FAMILIES.values() if f.kohya_prefixes)
                ctx.error(
                    (*where, "layout"),
                    f"kohya layout export is implemented for {writable}, not {info.label}",
                    "use layout: diffusers",
                )
        if isinstance(spec, GridOutput):
            _check_grid(ctx, name, spec, family)
            _check_grid_pipeline(ctx, name, family, pipeline_class)
    return normalized
