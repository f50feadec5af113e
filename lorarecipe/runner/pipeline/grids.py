"""Sample grids on the loaded pipeline: rows prompt × seed, columns the recipe's variants.

RenderGrid step + pipeline -> images, a labelled PNG, one PNG per cell and a JSON sidecar.
Variants switch with set_adapters / disable_lora (never by reloading); cells that need LoRA layers
are rendered before the fuse, ``fused`` cells after it, on the same pipeline. When the grid shows
``fused``, the runtime equivalent (set_adapters with the fused weights and ``scale=lora_scale``) is
also rendered and the largest pixel difference is reported, so a user sees that fusing changed
nothing but speed. Seeds use CPU generators, so the same recipe gives the same bytes on CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...families import FAMILIES, GridCall
from ...fs.atomic import atomic_dir, atomic_write_bytes
from ...outputs.grid_image import compose_grid, png_bytes
from ...plan import FuseAdapters, Plan, RenderGrid, SetAdapters, thaw_weight
from .fuse import apply_mix

__all__ = ["GridRenderer", "GridResult"]

BATCH = 4


@dataclass(frozen=True)
class Column:
    label: str
    variant: str
    adapters: tuple[str, ...] = ()
    weights: tuple[Any, ...] = ()
    scale: float | None = None
    fused: bool = False
    hidden: bool = False
    words: tuple[str, ...] = ()


@dataclass
class GridResult:
    path: Path
    extra_files: list[Path] = field(default_factory=list)
    cells: list[dict[str, Any]] = field(default_factory=list)
    fused_vs_runtime_max_diff: float | None = None


def _zero_unfused(weight: Any, components: tuple[str, ...] | None, all_components: list[str]) -> Any:
    """A set_adapters weight that keeps only the fused components (others weight 0)."""
    if components is None:
        return thaw_weight(weight)
    base = thaw_weight(weight)
    out: dict[str, Any] = {}
    for comp in all_components:
        if comp in components:
            out[comp] = base.get(comp, 1.0) if isinstance(base, dict) else base
        else:
            out[comp] = 0.0
    return out


class GridRenderer:
    """Renders one grid's cells on a pipeline that is shared with the rest of the build."""

    def __init__(self, pipe: Any, plan: Plan, step: RenderGrid, device: str) -> None:
        self.pipe, self.plan, self.step, self.device = pipe, plan, step, device
        self.words = dict(step.trigger_words)
        mixes = plan.of_type(SetAdapters)
        fuses = plan.of_type(FuseAdapters)
        self.mix: SetAdapters | None = mixes[0] if mixes else None
        self.fuse: FuseAdapters | None = fuses[0] if fuses else None
        self.columns = self._columns()
        self.rows = [(p, s) for p in step.prompts for s in step.seeds]
        self.images: dict[int, list[Any]] = {}

    # -- layout -------------------------------------------------------------------------------
    def _words(self, adapters: tuple[str, ...]) -> tuple[str, ...]:
        out: list[str] = []
        for name in adapters:
            out.extend(w for w in self.words.get(name, ()) if w not in out)
        return tuple(out)

    def _columns(self) -> list[Column]:
        step, cols = self.step, []
        for variant in step.variants:
            if variant == "base":
                cols.append(Column("base (LoRA off)", "base"))
            elif variant == "mix" and self.mix:
                desc = ", ".join(
                    f"{n} {thaw_weight(w)}" for n, w in zip(self.mix.adapters, self.mix.weights, strict=True)
                )
                cols.append(
                    Column(
                        f"mix: {desc}",
                        "mix",
                        self.mix.adapters,
                        self.mix.weights,
                        words=self._words(self.mix.adapters),
                    )
                )
            elif variant == "fused" and self.fuse:
                cols.append(
                    Column(
                        f"fused (lora_scale {self.fuse.lora_scale:g})",
                        "fused",
                        self.fuse.adapters,
                        fused=True,
                        words=self._words(self.fuse.adapters),
                    )
                )
            else:
                cols.append(Column(variant, variant, (variant,), (1.0,), words=self._words((variant,))))
        base_adapters = self.mix.adapters if self.mix else ()
        base_weights = self.mix.weights if self.mix else ()
        if step.sweep_adapter and step.sweep_weights:
            for w in step.sweep_weights:
                names = list(base_adapters) if step.sweep_adapter in base_adapters else [step.sweep_adapter]
                weights = [
                    w if n == step.sweep_adapter else base_weights[base_adapters.index(n)] for n in names
                ]
                cols.append(
                    Column(
                        f"{'mix, ' if len(names) > 1 else ''}{step.sweep_adapter} = {w:g}",
                        "sweep",
                        tuple(names),
                        tuple(weights),
                        words=self._words(tuple(names)),
                    )
                )
        if step.sweep_lora_scale:
            source = self.mix or self.fuse
            if source is not None:
                for s in step.sweep_lora_scale:
                    cols.append(
                        Column(
                            f"lora_scale = {s:g}",
                            "sweep",
                            source.adapters,
                            source.weights,
                            scale=s,
                            words=self._words(source.adapters),
                        )
                    )
        if self.fuse and any(c.fused for c in cols):
            cols.append(
                Column(
                    "fused (runtime equivalent)",
                    "fused-runtime",
                    self.fuse.adapters,
                    self.fuse.weights,
                    scale=self.fuse.lora_scale,
                    hidden=True,
                    words=self._words(self.fuse.adapters),
                )
            )
        return cols

    @property
    def needs_fused(self) -> bool:
        return any(c.fused for c in self.columns)

    # -- rendering ----------------------------------------------------------------------------
    def _configure(self, col: Column) -> dict[str, Any]:
        pipe = self.pipe
        has_lora = bool(getattr(pipe, "get_list_adapters", lambda: {})())
        if col.fused or not has_lora:
            return {}
        if col.variant == "base":
            pipe.disable_lora()
            return {}
        pipe.enable_lora()
        weights = list(col.weights)
        if col.variant == "fused-runtime" and self.fuse is not None:
            comps = [
                c for c in getattr(pipe, "_lora_loadable_modules", []) if getattr(pipe, c, None) is not None
            ]
            weights = [_zero_unfused(w, self.fuse.components, comps) for w in col.weights]
        else:
            weights = [thaw_weight(w) for w in weights]
        apply_mix(pipe, col.adapters, tuple(weights), self.plan.family)
        if col.scale is None:
            return {}
        return {self.call.attention_kwargs: {"scale": col.scale}}

    @property
    def call(self) -> GridCall:
        """The family's call conventions (SD's when the family is unknown)."""
        family = FAMILIES.get(self.plan.family or "sd1")
        return (family or FAMILIES["sd1"]).grid

    def _guidance(self, rows: int) -> dict[str, Any]:
        """Negative prompt and true CFG as the family takes them: always for CFG families; for
        guidance-distilled ones (FLUX.1) only with true_cfg_scale."""
        if self.call.negative_prompt == "native":
            return {"negative_prompt": [self.step.negative_prompt] * rows}
        if self.step.true_cfg_scale is not None:
            return {
                "negative_prompt": [self.step.negative_prompt] * rows,
                "true_cfg_scale": self.step.true_cfg_scale,
            }
        return {}

    def _render(self, col: Column) -> list[Any]:
        import torch

        step, out = self.step, []
        extra = self._configure(col)
        for start in range(0, len(self.rows), BATCH):
            chunk = self.rows[start : start + BATCH]
            prompts = [(", ".join(col.words) + ", " + p) if col.words else p for p, _ in chunk]
            generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]
            result = self.pipe(
                prompt=prompts,
                **self._guidance(len(chunk)),
                num_inference_steps=step.steps,
                guidance_scale=step.guidance,
                width=step.width,
                height=step.height,
                generator=generators,
                output_type="np",
                **extra,
            )
            out.extend(list(result.images))
        if col.variant == "base" and getattr(self.pipe, "get_list_adapters", lambda: {})():
            self.pipe.enable_lora()
        return out

    def render_unfused(self) -> None:
        for index, col in enumerate(self.columns):
            if not col.fused:
                self.images[index] = self._render(col)

    def render_fused(self) -> None:
        for index, col in enumerate(self.columns):
            if col.fused:
                self.images[index] = self._render(col)

    # -- output -------------------------------------------------------------------------------
    def write(self, final: Path, metadata: dict[str, str]) -> GridResult:
        import numpy as np
        from PIL import Image

        visible = [(i, c) for i, c in enumerate(self.columns) if not c.hidden and i in self.images]
        to_pil = {
            i: [Image.fromarray(np.clip(np.round(a * 255), 0, 255).astype("uint8")) for a in self.images[i]]
            for i, _ in visible
        }
        result = GridResult(final)
        fused = next((i for i, c in enumerate(self.columns) if c.fused and i in self.images), None)
        ref = next(
            (i for i, c in enumerate(self.columns) if c.variant == "fused-runtime" and i in self.images), None
        )
        if fused is not None and ref is not None:
            result.fused_vs_runtime_max_diff = float(
                max(np.abs(a - b).max() for a, b in zip(self.images[fused], self.images[ref], strict=True))
            )
        row_labels = [f"{p}\nseed {s}" for p, s in self.rows]
        cells = [[to_pil[i][r] for i, _ in visible] for r in range(len(self.rows))]
        title = (
            f"{self.plan.name} {self.plan.build}".strip()
            + f"  {metadata.get('lorarecipe.fingerprint', '')[:19]}"
        )
        grid = compose_grid(cells, row_labels, [c.label for _, c in visible], title)
        cells_dir = final.with_name(final.stem + "_cells")
        cell_docs = []
        with atomic_dir(cells_dir) as tmp:
            for r, (prompt, seed) in enumerate(self.rows):
                for c, (i, col) in enumerate(visible):
                    name = f"r{r:02d}_c{c:02d}_{col.variant}.png"
                    doc = {
                        "row": r,
                        "column": c,
                        "variant": col.variant,
                        "label": col.label,
                        "prompt": (", ".join(col.words) + ", " + prompt) if col.words else prompt,
                        "seed": seed,
                        "adapters": list(col.adapters),
                        "weights": [thaw_weight(w) for w in col.weights],
                        "scale": col.scale,
                        "file": f"{cells_dir.name}/{name}",
                    }
                    chunks: dict[str, str] = {
                        **metadata,
                        "lorarecipe.variant": col.variant,
                        "lorarecipe.prompt": str(doc["prompt"]),
                        "lorarecipe.seed": str(seed),
                    }
                    (tmp / name).write_bytes(png_bytes(to_pil[i][r], chunks))
                    cell_docs.append(doc)
        sidecar = {
            "grid": final.name,
            "recipe": self.plan.name,
            "build": self.plan.build,
            "fingerprint": metadata.get("lorarecipe.fingerprint"),
            "steps": self.step.steps,
            "guidance": self.step.guidance,
            "negative_prompt": self.step.negative_prompt,
            "size": [self.step.width, self.step.height],
            "columns": [c.label for _, c in visible],
            "fused_vs_runtime_max_abs_diff": result.fused_vs_runtime_max_diff,
            "cells": cell_docs,
        }
        layout = json.dumps({k: v for k, v in sidecar.items() if k != "cells"}, sort_keys=True)
        atomic_write_bytes(final, png_bytes(grid, {**metadata, "lorarecipe.grid": layout}))
        sidecar_path = final.with_suffix(".json")
        atomic_write_bytes(sidecar_path, (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())
        result.cells = cell_docs
        result.extra_files = [sidecar_path, *sorted(cells_dir.iterdir())]
        return result
