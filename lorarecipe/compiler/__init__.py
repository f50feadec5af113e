"""Compiler: a validated recipe build -> a :class:`~lorarecipe.plan.Plan`, after static checks.

Checks run before any weight is loaded (safetensors headers and JSON configs only): inputs
(``inputs``), cross-references and PEFT's merge rules (``references``), outputs (``outputs``). All
problems are collected and raised together as one ``RecipeCompileError``. The compiler builds new
objects and never mutates the recipe; it never imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import LorarecipeError, Problem, RecipeCompileError
from ..families import GridCall, get_family
from ..plan import (
    Check,
    CheckpointLayout,
    FuseAdapters,
    LoadAdapter,
    LoadBase,
    LoraLayout,
    MergeAdapters,
    Plan,
    RenderGrid,
    SaveCheckpoint,
    SaveLora,
    SetAdapters,
    Step,
    _freeze,
)
from ..recipe.load import LoadedRecipe, RecipeBuild, load_recipe
from ..recipe.models import ComponentWeights, GridOutput, LoraOutput, PipelineOutput, SingleFileOutput
from ..recipe.vocabulary import FAMILIES
from .block_weights import canonical_component_weights
from .context import CompileContext
from .estimates import estimate_memory
from .inputs import InputFacts, check_inputs
from .outputs import check_outputs, default_weight_name, lora_component
from .publish import check_publish
from .references import adapter_components, check_references

__all__ = ["compile_recipe", "compile_recipe_file"]


def _weight_value(weight: Any, family: str | None) -> Any:
    if isinstance(weight, ComponentWeights):
        return _freeze(canonical_component_weights(weight.model_dump(exclude_none=True), family))
    return float(weight)


def _adapter_step_id(ctx: CompileContext, name: str) -> str:
    return f"merge:{name}" if name in ctx.recipe.merges else f"adapter:{name}"


def _trigger_words(ctx: CompileContext, name: str, seen: frozenset[str] = frozenset()) -> tuple[str, ...]:
    recipe = ctx.recipe
    if name in recipe.adapters:
        return tuple(recipe.adapters[name].trigger_words)
    if name in recipe.merges and name not in seen:
        words: list[str] = []
        for dep, _ in recipe.merges[name].pairs():
            words.extend(w for w in _trigger_words(ctx, dep, seen | {name}) if w not in words)
        return tuple(words)
    return ()


def _steps(
    ctx: CompileContext, inputs: InputFacts, merge_order: list[str], paths: dict[str, str]
) -> list[Step]:
    recipe = ctx.recipe
    spec = recipe.base
    steps: list[Step] = [
        LoadBase(
            id="base",
            origin=ctx.origin(("base",)),
            source=inputs.base_source,
            family=inputs.family,
            dtype=spec.dtype,
            variant=spec.variant,
            config=inputs.config_source,
            single_file=spec.file is not None,
        )
    ]
    for name, adapter in recipe.adapters.items():
        steps.append(
            LoadAdapter(
                id=f"adapter:{name}",
                inputs=("base",),
                origin=ctx.origin(("adapters", name)),
                name=name,
                source=inputs.adapters[name].source,
                format=adapter.format,
                trigger_words=tuple(adapter.trigger_words),
                load_into=tuple(adapter.load_into) if adapter.load_into else None,
                scale_convention=adapter.scale_convention,
                difference=adapter.checkpoint is not None,
            )
        )
    for name in merge_order:
        merge = recipe.merges[name]
        pairs = merge.pairs()
        steps.append(
            MergeAdapters(
                id=f"merge:{name}",
                inputs=tuple(_adapter_step_id(ctx, n) for n, _ in pairs),
                origin=ctx.origin(("merges", name)),
                name=name,
                method=merge.method,
                adapters=tuple(n for n, _ in pairs),
                weights=tuple(float(w) for _, w in pairs),
                density=merge.density,
                majority_sign_method=merge.majority_sign_method,
                svd_rank=merge.svd_rank,
                svd_clamp=merge.svd_clamp,
                svd_energy=merge.svd_energy,
                svd_full_matrices=merge.svd_full_matrices,
                svd_driver=merge.svd_driver,
                seed=merge.seed,
                components=tuple(merge.components) if merge.components else None,
            )
        )
    mix_weights: dict[str, Any] = {}
    if recipe.set_adapters is not None:
        pairs = recipe.set_adapters.pairs()
        mix_weights = {n: _weight_value(w, inputs.family) for n, w in pairs}
        steps.append(
            SetAdapters(
                id="mix",
                inputs=tuple(_adapter_step_id(ctx, n) for n, _ in pairs),
                origin=ctx.origin(("set_adapters",)),
                adapters=tuple(mix_weights),
                weights=tuple(mix_weights.values()),
            )
        )
    if recipe.fuse is not None:
        names = tuple(recipe.fuse.adapters or mix_weights)
        deps = ("base", *(_adapter_step_id(ctx, n) for n in names), *(("mix",) if mix_weights else ()))
        steps.append(
            FuseAdapters(
                id="fuse",
                inputs=deps,
                origin=ctx.origin(("fuse",)),
                adapters=names,
                weights=tuple(mix_weights.get(n, 1.0) for n in names),
                lora_scale=float(recipe.fuse.lora_scale),
                components=tuple(recipe.fuse.components) if recipe.fuse.components else None,
            )
        )
    for name, out in recipe.outputs.items():
        origin = ctx.origin(("outputs", name))
        path = paths.get(name, out.path)
        if isinstance(out, (PipelineOutput, SingleFileOutput)):
            steps.append(
                SaveCheckpoint(
                    id=f"output:{name}",
                    inputs=("fuse",),
                    origin=origin,
                    output=name,
                    layout=(
                        CheckpointLayout.DIFFUSERS
                        if isinstance(out, PipelineOutput)
                        else CheckpointLayout.SINGLE_FILE
                    ),
                    path=path,
                    dtype=out.dtype,
                    card=bool(getattr(out, "card", False)),
                    component=getattr(out, "component", None),
                )
            )
        elif isinstance(out, LoraOutput):
            steps.append(
                SaveLora(
                    id=f"output:{name}",
                    inputs=(_adapter_step_id(ctx, out.adapter),),
                    origin=origin,
                    output=name,
                    adapter=out.adapter,
                    layout=LoraLayout(out.layout),
                    path=path,
                    weight_name=default_weight_name(out),
                    dtype=out.dtype,
                    card=out.card,
                    component=lora_component(ctx, out, inputs),
                )
            )
        elif isinstance(out, GridOutput):
            steps.append(_grid_step(ctx, name, out, path, inputs.family))
    return steps


def _grid_step(ctx: CompileContext, name: str, out: GridOutput, path: str, family: str | None) -> RenderGrid:
    deps: list[str] = ["base"]
    for variant in out.variants:
        dep = {"base": "base", "mix": "mix", "fused": "fuse"}.get(variant) or _adapter_step_id(ctx, variant)
        if dep not in deps:
            deps.append(dep)
    if out.sweep and out.sweep.adapter and _adapter_step_id(ctx, out.sweep.adapter) not in deps:
        deps.append(_adapter_step_id(ctx, out.sweep.adapter))
    width: int | None
    height: int | None
    if isinstance(out.size, int):
        width = height = out.size
    elif isinstance(out.size, list):
        width, height = out.size
    else:
        default = 64 if ctx.recipe.base.builtin else (FAMILIES[family].default_size if family else None)
        width = height = default
    frames = None
    if _grid_call(family).frames:
        frames = out.frames or (9 if ctx.recipe.base.builtin else _grid_call(family).frames)
    words = tuple(
        (n, _trigger_words(ctx, n))
        for n in [*ctx.recipe.adapters, *ctx.recipe.merges]
        if _trigger_words(ctx, n)
    )
    return RenderGrid(
        id=f"output:{name}",
        inputs=tuple(deps),
        origin=ctx.origin(("outputs", name)),
        output=name,
        path=path,
        prompts=tuple(out.prompts),
        negative_prompt=out.negative_prompt,
        seeds=tuple(out.seeds),
        steps=out.steps,
        guidance=float(out.guidance if out.guidance is not None else _grid_call(family).default_guidance),
        width=width,
        height=height,
        variants=tuple(out.variants),
        sweep_adapter=out.sweep.adapter if out.sweep else None,
        sweep_weights=tuple(out.sweep.weights) if out.sweep and out.sweep.weights else None,
        sweep_lora_scale=tuple(out.sweep.lora_scale) if out.sweep and out.sweep.lora_scale else None,
        trigger_words=words if out.trigger_words else (),
        threads=out.threads,
        true_cfg_scale=out.true_cfg_scale,
        frames=frames,
        compile=out.compile,
    )


def _grid_call(family: str | None) -> GridCall:
    known = get_family(family)
    return known.grid if known is not None else FAMILIES["sd1"].grid


def _fused_components(ctx: CompileContext, inputs: InputFacts) -> set[str] | None:
    """The components the fuse changes, from the LoRA headers; None when a header is not available
    yet (an uncached hub LoRA)."""
    recipe = ctx.recipe
    if recipe.fuse is None:
        return set()
    names = recipe.fuse.adapters or [
        n for n, _ in (recipe.set_adapters.pairs() if recipe.set_adapters else [])
    ]
    found: set[str] = set()
    for name in names:
        part = adapter_components(ctx, inputs, name)
        if part is None:
            return None
        found |= part
    return {c for c in found if recipe.fuse.components is None or c in recipe.fuse.components}


def _check_edges(steps: list[Step]) -> None:
    """Every edge must carry a kind its consumer accepts (e.g. fusing into a LoRA is refused)."""
    produced = {s.id: s.produces for s in steps}
    for step in steps:
        for dep in step.inputs:
            kind = produced.get(dep)
            if kind is None or kind not in step.consumes:
                raise RecipeCompileError(f"internal plan error: {step.id} cannot consume {dep} ({kind})")


def compile_recipe(
    loaded: LoadedRecipe, build: RecipeBuild | None = None, *, allow_read: Sequence[Path] = ()
) -> Plan:
    """Compile one build of a loaded recipe (the first when ``build`` is None) into a plan."""
    build = build or loaded.builds[0]
    ctx = CompileContext(loaded, build, allow_read=tuple(allow_read))
    inputs = check_inputs(ctx)
    order = check_references(ctx, inputs)
    paths = check_outputs(ctx, inputs, _fused_components(ctx, inputs))
    publish = check_publish(ctx, build.recipe.name or loaded.name)
    if ctx.errors:
        raise RecipeCompileError(ctx.errors[0].message, ctx.problems)
    steps = _steps(ctx, inputs, order, paths)
    _check_edges(steps)
    warnings = [Check(p.path, "warning", p.message) for p in ctx.problems if p.severity == "warning"]
    recipe = build.recipe
    meta = tuple((k, v) for k, v in (("description", recipe.description), ("license", recipe.license)) if v)
    plan = Plan(
        recipe=loaded.display,
        name=recipe.name or loaded.name,
        build=build.label,
        family=inputs.family,
        steps=tuple(steps),
        variables=build.variables,
        checks=tuple(ctx.checks + warnings),
        meta=meta,
        publish=publish,
    )
    return dataclasses.replace(plan, estimates=tuple(estimate_memory(plan, inputs).items()))


def compile_recipe_file(
    path: Path, overrides: Mapping[str, str] | None = None, allow_read: Sequence[Path] = ()
) -> list[Plan]:
    """Load a recipe file (with ``--set`` overrides) and compile every build of its matrix; the
    problems of all builds are raised together in one ``RecipeCompileError``."""
    loaded = load_recipe(path, dict(overrides or {}))
    plans: list[Plan] = []
    problems: list[Problem] = []
    for build in loaded.builds:
        try:
            plans.append(compile_recipe(loaded, build, allow_read=allow_read))
        except LorarecipeError as exc:
            problems.extend(p for p in exc.problems if p not in problems)
    seen: dict[tuple[str, str], str] = {}
    for plan in plans:  # matrix builds of one recipe must not publish over each other
        for target in plan.publish:
            key = (target.repo.lower(), target.revision)
            other = seen.setdefault(key, plan.build)
            if other != plan.build:
                message = (
                    f"builds {other or '(default)'} and {plan.build} both publish outputs.{target.output} to "
                    f"{target.repo} @ {target.revision}"
                )
                hint = "put {{ build }} (or a matrix variable) in the repo name"
                where = ("outputs", target.output, "publish", "repo")
                span = loaded.positions.value(where)
                problems.append(Problem(message, ".".join(where), span, hint))
    if problems:
        raise RecipeCompileError(problems[0].message, problems)
    return plans
