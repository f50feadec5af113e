"""Model cards: a README.md for each fused-pipeline and LoRA output.

Build facts -> Markdown with Hugging Face front matter (``ModelCardData``: base_model, tags incl.
``lora`` and ``lorarecipe``, pipeline_tag, trigger words as instance_prompt, license) and a body
rendered from the packaged ``templates/model_card.md.j2`` in a jinja2 sandbox: the adapters with
their sources and sha256, the strategy in words, the sample grid, usage, and the recipe itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..plan import (
    FuseAdapters,
    LoadAdapter,
    MergeAdapters,
    Plan,
    SaveCheckpoint,
    SaveLora,
    SetAdapters,
    Source,
)
from ..plan.view import describe_weight
from ..recipe.vocabulary import COMBINATION_TYPES

__all__ = ["CardInput", "render_card"]


@dataclass
class CardInput:
    """What a card needs beyond the plan: resolved inputs and the grid to show."""

    recipe_text: str
    version: str
    description: str | None = None
    license: str | None = None
    base_commit: str | None = None
    adapter_sha256: dict[str, str] = field(default_factory=dict)  # adapter name -> sha256 of its file
    grid_path: str | None = None  # relative to the output folder
    grid_caption: str = ""


_SCHEMA_COMMENT = re.compile(r"^\s*#\s*yaml-language-server:\s*\$schema=")


def _weight(value: Any) -> str:
    return describe_weight(value)


def strategy_lines(plan: Plan, adapters: list[str] | None = None, fused: bool = True) -> list[str]:
    """The merge / mix / fuse steps of a plan in words (only merges among ``adapters`` when given)."""
    lines = []
    for merge in plan.of_type(MergeAdapters):
        if adapters is not None and merge.name not in adapters:
            continue
        parts = ", ".join(f"{n} × {w:g}" for n, w in zip(merge.adapters, merge.weights, strict=True))
        opts = [
            f"{k} {getattr(merge, k)}"
            for k in ("density", "majority_sign_method", "svd_rank", "svd_energy", "svd_clamp", "svd_driver")
            if getattr(merge, k) is not None
        ]
        rule = COMBINATION_TYPES[merge.method]
        if rule.random:
            opts.append(f"seed {merge.seed}")
        extra = f" ({', '.join(opts)})" if opts else ""
        how = (
            f"PEFT `add_weighted_adapter` with combination type `{merge.method}`"
            if rule.peft
            else "`extract`"
        )
        lines.append(f"`{merge.name}` = {how}{extra} of {parts}: {rule.description}.")
    if not fused:
        return lines
    for mix in plan.of_type(SetAdapters):
        parts = ", ".join(f"{n} {_weight(w)}" for n, w in zip(mix.adapters, mix.weights, strict=True))
        lines.append(f"Runtime mix (`set_adapters`): {parts}.")
    for fuse in plan.of_type(FuseAdapters):
        parts = ", ".join(f"{n} {_weight(w)}" for n, w in zip(fuse.adapters, fuse.weights, strict=True))
        comps = ", ".join(fuse.components) if fuse.components else "all LoRA components"
        lines.append(
            f"Fused into the base weights (`fuse_lora`, lora_scale {fuse.lora_scale:g}, {comps}): {parts}."
        )
    return lines


def _trigger_words(plan: Plan, adapters: list[str]) -> list[str]:
    words: list[str] = []
    for step in plan.steps:
        if step.op == "load_adapter" and getattr(step, "name", None) in adapters:
            words.extend(w for w in getattr(step, "trigger_words", ()) if w not in words)
    return words


def _involved(plan: Plan, names: tuple[str, ...]) -> list[str]:
    """Adapters that feed ``names`` (merges expanded to their inputs), in plan order."""
    merges = {m.name: m for m in plan.of_type(MergeAdapters)}
    seen: list[str] = []

    def visit(name: str) -> None:
        if name in merges:
            for dep in merges[name].adapters:
                visit(dep)
        if name not in seen:
            seen.append(name)

    for name in names:
        visit(name)
    return seen


def _usage(step: SaveCheckpoint | SaveLora, base: Source) -> str:
    if isinstance(step, SaveLora):
        base_ref = base.ref if base.kind == "hub" else "<the base model>"
        return (
            "from diffusers import DiffusionPipeline\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{base_ref}")\n'
            f'pipe.load_lora_weights(".", weight_name="{step.weight_name}", adapter_name="{step.adapter}")\n'
            'image = pipe("your prompt").images[0]'
        )
    return (
        'from diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained(".")\n'
        'image = pipe("your prompt").images[0]'
    )


def _without_schema_comment(text: str) -> str:
    """The recipe as embedded in a card: its ``# yaml-language-server: $schema=<relative path>`` line
    would point nowhere from the card's folder, so it is dropped."""
    return "".join(line for line in text.splitlines(keepends=True) if not _SCHEMA_COMMENT.match(line))


def render_card(plan: Plan, step: SaveCheckpoint | SaveLora, facts: CardInput) -> str:
    """README.md text for one output (front matter + sandboxed template body)."""
    from huggingface_hub import ModelCard, ModelCardData
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    base = plan.step("base")
    source: Source = base.source  # type: ignore[attr-defined]
    if isinstance(step, SaveLora):
        adapters = _involved(plan, (step.adapter,))
        kind_text = f"A LoRA adapter (`{step.adapter}`, {step.layout} layout)"
        title = f"{plan.name}: LoRA {step.adapter}"
    else:
        fuse = plan.of_type(FuseAdapters)[0]
        adapters = _involved(plan, fuse.adapters)
        kind_text = "A fused checkpoint (LoRAs baked into the base weights)"
        title = f"{plan.name}: fused {'pipeline' if step.layout == 'diffusers' else 'checkpoint'}"
    loads: dict[str, LoadAdapter] = {s.name: s for s in plan.of_type(LoadAdapter)}
    words = _trigger_words(plan, adapters)
    data = ModelCardData(
        base_model=source.ref if source.kind == "hub" else None,
        license=facts.license,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        # a fused pipeline is a full model, not an adapter: the Hub lists "lora"-tagged repos as adapters
        tags=[
            *(["lora"] if isinstance(step, SaveLora) else []),
            "lorarecipe",
            "diffusers",
            "text-to-image",
            *([plan.family] if plan.family else []),
        ],
        instance_prompt=", ".join(words) if words else None,
    )
    env = ImmutableSandboxedEnvironment(
        autoescape=False, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )
    template = (
        resources.files("lorarecipe.outputs")
        .joinpath("templates/model_card.md.j2")
        .read_text(encoding="utf-8")
    )
    body = env.from_string(template).render(
        title=title,
        description=facts.description,
        kind_text=kind_text,
        version=facts.version,
        recipe_path=plan.recipe,
        build=plan.build,
        fingerprint=plan.fingerprint(),
        base={"describe": source.describe(), "commit": facts.base_commit, "family": plan.family},
        adapters=[
            {
                "name": n,
                "describe": loads[n].source.describe(),
                "sha256": facts.adapter_sha256.get(n, "?"),
                "trigger_words": list(loads[n].trigger_words),
            }
            for n in adapters
            if n in loads
        ],
        strategy=strategy_lines(plan, adapters, fused=isinstance(step, SaveCheckpoint)),
        trigger_words=words,
        grid={"path": facts.grid_path, "title": "sample grid", "caption": facts.grid_caption}
        if facts.grid_path
        else None,
        usage=_usage(step, source),
        recipe_text=_without_schema_comment(facts.recipe_text).rstrip("\n"),
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return str(card)
