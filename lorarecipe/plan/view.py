"""Plan -> the readable tree ``lorarecipe plan`` prints (what is loaded, merged, fused, written)."""

from __future__ import annotations

from typing import Any

from ..diagnostics import printable
from . import (
    FuseAdapters,
    LoadAdapter,
    LoadBase,
    MergeAdapters,
    Plan,
    RenderGrid,
    SaveCheckpoint,
    SaveLora,
    SetAdapters,
    Step,
    thaw_weight,
)

__all__ = ["describe_weight", "render_plan"]


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def describe_weight(weight: Any) -> str:
    """A set_adapters weight as short readable text: ``0.7``, or per component and block
    ``unet(down 0.9, up block_1 0.6/1) text_encoder 0.8``."""

    def number(value: Any) -> str:
        if isinstance(value, list):
            return "/".join(number(v) for v in value)
        return f"{value:g}" if isinstance(value, (int, float)) else str(value)

    def blocks(value: Any) -> str:
        if isinstance(value, dict):
            return " ".join(f"{k} {number(v)}" for k, v in value.items())
        return number(value)

    value = thaw_weight(weight)
    if not isinstance(value, dict):
        return number(value)
    parts = []
    for component, part in value.items():
        if isinstance(part, dict):
            parts.append(f"{component}({', '.join(f'{k} {blocks(v)}' for k, v in part.items())})")
        else:
            parts.append(f"{component} {number(part)}")
    return " ".join(parts)


def _weight(w: Any) -> str:
    value = thaw_weight(w)
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{k}: {_weight(v) if isinstance(v, tuple) else v}" for k, v in value.items())
            + "}"
        )
    return f"{value:g}" if isinstance(value, float) else str(value)


def _line(step: Step, checks: dict[str, str]) -> str:
    if isinstance(step, LoadBase):
        extra = [step.family or "family unknown", step.dtype if step.dtype != "auto" else "stored dtype"]
        if step.variant:
            extra.append(f"variant {step.variant}")
        text = f"load base      {step.source.describe()}  [{', '.join(extra)}]"
        return text + (f"  ({checks['base']})" if "base" in checks else "")
    if isinstance(step, LoadAdapter):
        text = f"load adapter   {step.name}: {step.source.describe()}"
        if step.load_into:
            text += f" -> {', '.join(step.load_into)}"
        note = checks.get(f"adapters.{step.name}")
        return text + (f"  ({note})" if note else "")
    if isinstance(step, MergeAdapters):
        params = [f"{n}×{w:g}" for n, w in zip(step.adapters, step.weights, strict=True)]
        opts = [
            f"{k}={getattr(step, k)}"
            for k in ("density", "majority_sign_method", "svd_rank", "svd_energy", "svd_clamp", "svd_driver")
            if getattr(step, k) is not None
        ]
        if step.method.startswith("dare"):
            opts.append(f"seed={step.seed}")
        options = ("; " + ", ".join(opts)) if opts else ""
        return f"merge          {step.name} = {step.method}({', '.join(params)}{options})"
    if isinstance(step, SetAdapters):
        mix = ", ".join(f"{n}={_weight(w)}" for n, w in zip(step.adapters, step.weights, strict=True))
        return f"set_adapters   {mix}"
    if isinstance(step, FuseAdapters):
        mix = ", ".join(f"{n}={_weight(w)}" for n, w in zip(step.adapters, step.weights, strict=True))
        comps = f", components {', '.join(step.components)}" if step.components else ""
        return f"fuse           {mix}  lora_scale={step.lora_scale:g}{comps}  -> fused checkpoint"
    if isinstance(step, SaveCheckpoint):
        kind = "diffusers folder" if step.layout == "diffusers" else "single .safetensors file"
        holds = f" of {step.component}" if step.component else ""
        return f"write          {step.path}  ({kind}{holds}{', ' + step.dtype if step.dtype else ''})"
    if isinstance(step, SaveLora):
        holds = f", {step.component} layers" if step.component else ""
        return f"write          {step.path}/{step.weight_name}  ({step.layout} LoRA of {step.adapter}{holds})"
    if isinstance(step, RenderGrid):
        axis = ""
        if step.sweep_weights:
            axis = f" × {step.sweep_adapter} weight {list(step.sweep_weights)}"
        elif step.sweep_lora_scale:
            axis = f" × lora_scale {list(step.sweep_lora_scale)}"
        cells = len(step.prompts) * len(step.seeds)
        return (
            f"render grid    {step.path}  ({cells} rows × columns {', '.join(step.variants)}{axis}; "
            f"{step.steps} steps, {step.width or '?'}×{step.height or '?'}"
            + (f", {step.frames} frames)" if step.frames else ")")
        )
    return step.op  # pragma: no cover


def render_plan(plan: Plan) -> str:
    """Human-readable tree of one plan."""
    checks = {c.subject: c.detail.split(": ", 1)[-1] for c in plan.checks if c.status != "warning"}
    title = f"plan {plan.name}" + (f" [{plan.build}]" if plan.build else "")
    lines = [
        printable(f"{title}  ({plan.recipe}, family {plan.family or 'unknown'})"),
        f"fingerprint {plan.fingerprint()}",
    ]
    for i, step in enumerate(plan.steps):
        branch = "└─" if i == len(plan.steps) - 1 else "├─"
        lines.append(f"{branch} {printable(_line(step, checks), None)}")
    estimates = dict(plan.estimates)
    if estimates:
        lines.append(
            "estimated peak memory: "
            + ", ".join(f"{k} {format_bytes(v)}" for k, v in estimates.items() if k != "basis")
        )
    for check in plan.checks:
        if check.status == "warning":
            lines.append(printable(f"warning: {check.subject}: {check.detail}"))
    return "\n".join(lines)
