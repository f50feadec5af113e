"""Sample grids on the loaded pipeline: rows prompt × seed, columns the recipe's variants.

RenderGrid step + pipeline -> images, a labelled PNG, one PNG per cell and a JSON sidecar.
Variants switch with set_adapters / disable_lora (never by reloading); LyCORIS/DoRA adapters, which
have no runtime form, are applied to the weights in place for their cells and restored from copies
afterwards (``pipeline.lycoris``). Cells that need LoRA layers are rendered before the fuse, ``fused``
cells after it, on the same pipeline. When the grid shows
``fused``, the runtime equivalent (set_adapters with the fused weights and ``scale=lora_scale``) is
also rendered and the largest pixel difference is reported, so a user sees that fusing changed
nothing but speed. Seeds use CPU generators and rendering runs at the grid's fixed torch thread count
(``threads``, restored afterwards), so the same recipe gives the same bytes on any CPU machine.

Cells are rendered in batches (one column × up to ``BATCH`` rows) and each batch is kept in the cell
cache (``grid_cache``) under a key of everything its pixels depend on: a rebuild renders only the
batches whose key changed, and loads no pipeline when none did.

With ``compiled`` set (grid ``compile: regional``), each batch renders through that compiled copy of
the denoiser, the column's weights copied in first (``compiled``); its cells are keyed apart from
eager ones (``facts["compile"]``), since their pixels may differ by rounding.

Video families (Wan): a cell is a clip of ``frames`` frames. It is kept as one frame strip (the frames
side by side, lossless), shown as that strip in the grid PNG, and written beside its PNG as an
animated lossless WebP (``video``), so a pull request shows the motion; both are deterministic bytes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import BuildError
from ...families import FAMILIES, GridCall, get_family, needs_input_image
from ...fs.atomic import atomic_dir, atomic_write_bytes
from ...outputs.grid_image import compose_grid, png_bytes
from ...outputs.manifest import library_versions
from ...outputs.video import frame_strip, strip_frames, webp_bytes
from ...plan import (
    LoadAdapter,
    LoadBase,
    MergeAdapters,
    Plan,
    RenderGrid,
    thaw_weight,
)
from ..lycoris_adapters import LycorisAdapter, delta_terms
from .fuse import apply_mix
from .grid_cache import CachedBatch, CellCache, batch_key
from .grid_layout import BATCH, Column, GridLayout
from .lycoris import applied

__all__ = ["GridRenderer", "GridResult"]


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
    """Renders one grid's missing cell batches on a pipeline shared with the rest of the build.

    ``facts`` are what the cell keys need from the build: ``dtype`` and ``device`` of the pipeline and
    ``digests`` (step id -> content hash of each base/adapter input, and ``config`` for a single-file
    base's config folder). ``attach(pipe)`` gives it the pipeline once one is loaded.
    """

    def __init__(
        self, plan: Plan, step: RenderGrid, facts: dict[str, Any], cache: CellCache | None = None
    ) -> None:
        self.pipe: Any = None
        self.lycoris: dict[str, LycorisAdapter] = {}
        self.plan, self.step, self.facts = plan, step, facts
        self.cache = cache or CellCache()
        layout = GridLayout(plan, step)
        self.mix, self.fuse = layout.mix, layout.fuse
        self.columns, self.rows, self.batches = layout.columns, layout.rows, layout.batches
        self.images: dict[tuple[int, int], list[Any]] = {}  # (column, batch) -> PIL images
        self.diffs: dict[int, float] = {}  # batch -> fused vs runtime largest difference
        self._runtime: dict[int, list[Any]] = {}  # batch -> runtime-equivalent float images
        self.rendered = 0  # visible cells rendered by this build (the others came from the cache)
        self.keys = {
            (c, b): self._key(c, b) for c in range(len(self.columns)) for b in range(len(self.batches))
        }
        self.pending = self._lookup()

    def attach(self, pipe: Any, lycoris: Mapping[str, LycorisAdapter] | None = None) -> None:
        """Render on ``pipe`` (a hub base's class is known only now: an edit pipeline renders no grid),
        with the LyCORIS/DoRA adapters lorarecipe applies itself (their columns change the weights in
        place for the cell and restore them afterwards)."""
        family = needs_input_image(type(pipe).__name__, self.plan.family)
        if family is not None:
            raise BuildError(
                f"the base is a {type(pipe).__name__}, which {family.image_input_use[0]}: grids render "
                "from prompts only; remove the grid output"
            )
        self.pipe = pipe
        self.lycoris = dict(lycoris or {})

    #: a CompiledDenoiser to render through (``compile: regional``), set by the executor
    compiled: Any = None

    # -- the cell cache -----------------------------------------------------------------------
    def _prompt(self, col: Column, prompt: str) -> str:
        return (", ".join(col.words) + ", " + prompt) if col.words else prompt

    def _key(self, index: int, batch: int) -> str:
        col, step = self.columns[index], self.step
        names = {s.name: s.id for s in self.plan.steps if isinstance(s, (LoadAdapter, MergeAdapters))}
        deps = ["base", *(names[a] for a in col.adapters if a in names)]
        if col.fused or col.variant == "fused-runtime":
            deps.append("fuse")
        used = self.plan.dependencies(*deps)
        digests = self.facts["digests"]
        column = {
            "variant": col.variant,
            "adapters": list(col.adapters),
            "weights": [thaw_weight(w) for w in col.weights],
            "scale": col.scale,
            "fused": col.fused,
            "steps": [s.payload() for s in used],
            "inputs": {s.id: digests.get(s.id) for s in used if isinstance(s, (LoadBase, LoadAdapter))},
            "config": digests.get("config"),
        }
        context = {
            "negative_prompt": step.negative_prompt,
            "steps": step.steps,
            "guidance": step.guidance,
            "size": [step.width, step.height],
            "threads": step.threads,
            "batch": BATCH,
            "family": self.plan.family,
            "dtype": self.facts["dtype"],
            "device": self.facts["device"],
            "libraries": library_versions(),
        }
        if self.facts.get("compile"):  # compiled cells: keyed apart from eager ones
            context["compile"] = self.facts["compile"]
        if step.true_cfg_scale is not None:  # FLUX.1 true CFG
            context["true_cfg_scale"] = step.true_cfg_scale
        if step.frames is not None:  # video families: a cell is a clip
            context["frames"] = step.frames
        rows = [(self._prompt(col, self.rows[r][0]), self.rows[r][1]) for r in self.batches[batch]]
        return batch_key(context, column, rows)

    def _lookup(self) -> set[tuple[int, int]]:
        """Fill ``images`` from the cache; return the (column, batch) pairs still to render (a fused
        batch brings its runtime-equivalent batch, which is never cached on its own)."""
        size = (self.step.width, self.step.height) if self.step.width and self.step.height else None
        if size is not None and self.step.frames:  # a clip is kept as its frame strip
            size = (size[0] * self.step.frames, size[1])
        pending: set[tuple[int, int]] = set()
        for index, col in enumerate(self.columns):
            if col.hidden:
                continue
            for batch, rows in enumerate(self.batches):
                found = self.cache.get(self.keys[(index, batch)], len(rows), size)
                if found is None or (col.fused and found.fused_vs_runtime is None):
                    pending.add((index, batch))
                    continue
                self.images[(index, batch)] = found.images
                if col.fused and found.fused_vs_runtime is not None:
                    self.diffs[batch] = found.fused_vs_runtime
        return self._with_runtime(pending)

    def _with_runtime(self, pending: set[tuple[int, int]]) -> set[tuple[int, int]]:
        """``pending`` and the runtime-equivalent batch of each fused batch in it."""
        runtime = next((i for i, c in enumerate(self.columns) if c.variant == "fused-runtime"), None)
        if runtime is not None:
            pending |= {(runtime, b) for i, b in pending if self.columns[i].fused}
        return pending

    def restrict(self, units: set[tuple[int, int]]) -> None:
        """Render only the missing ones of ``units`` (visible (column, batch) pairs: a grid shard)."""
        self.pending = self._with_runtime({u for u in self.pending if u in units})

    @property
    def needs_pipeline(self) -> bool:
        return bool(self.pending)

    @property
    def needs_fused(self) -> bool:
        return any(self.columns[i].fused for i, _ in self.pending)

    # -- rendering ----------------------------------------------------------------------------
    def _weights(self, col: Column) -> list[Any]:
        """The column's weights (the runtime equivalent of the fuse: 0 on the components not fused)."""
        if col.variant == "fused-runtime" and self.fuse is not None:
            pipe = self.pipe
            comps = [
                c for c in getattr(pipe, "_lora_loadable_modules", []) if getattr(pipe, c, None) is not None
            ]
            return [_zero_unfused(w, self.fuse.components, comps) for w in col.weights]
        return [thaw_weight(w) for w in col.weights]

    def _lycoris_terms(self, col: Column) -> dict[tuple[str, str], list[Any]]:
        """The column's LyCORIS/DoRA adapters as terms to apply in place for its cells."""
        if col.fused or col.variant == "base":
            return {}
        own = [
            (self.lycoris[a], w)
            for a, w in zip(col.adapters, self._weights(col), strict=True)
            if a in self.lycoris
        ]
        if not own:
            return {}
        return delta_terms(own, 1.0 if col.scale is None else col.scale, get_family(self.plan.family))

    def _configure(self, col: Column) -> dict[str, Any]:
        """set_adapters for the column's LoRAs (LoRA layers disabled when it has none); returns the
        call's LoRA scale argument."""
        pipe = self.pipe
        has_lora = bool(getattr(pipe, "get_list_adapters", lambda: {})())
        if col.fused or not has_lora:
            return {}
        loras = [
            (a, w) for a, w in zip(col.adapters, self._weights(col), strict=True) if a not in self.lycoris
        ]
        if col.variant == "base" or not loras:
            pipe.disable_lora()
            return {}
        pipe.enable_lora()
        apply_mix(pipe, tuple(a for a, _ in loras), tuple(w for _, w in loras), self.plan.family)
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
        guidance-distilled ones (FLUX.1) only with true_cfg_scale; never for FLUX.2 (none taken)."""
        if self.call.negative_prompt == "none":
            return {}
        if self.call.negative_prompt == "native":
            return {"negative_prompt": [self.step.negative_prompt] * rows}
        if self.step.true_cfg_scale is not None:
            return {
                "negative_prompt": [self.step.negative_prompt] * rows,
                "true_cfg_scale": self.step.true_cfg_scale,
            }
        return {}

    def _render(self, col: Column, batch: int) -> list[Any]:
        """One batch of one column as float images in [0, 1] (a video: its frames side by side), at the
        grid's fixed thread count."""
        import numpy as np
        import torch

        step = self.step
        extra = self._configure(col)
        if step.frames:
            extra["num_frames"] = step.frames
        rows = [self.rows[r] for r in self.batches[batch]]
        previous = torch.get_num_threads()
        torch.set_num_threads(step.threads)
        compiled = self.compiled
        denoiser = compiled.rendering(self.pipe, col.scale) if compiled else contextlib.nullcontext()
        try:
            # LyCORIS deltas go into the eager weights first: a compiled copy loads them from there
            with applied(self.pipe, self._lycoris_terms(col)), denoiser:
                result = self.pipe(
                    prompt=[self._prompt(col, p) for p, _ in rows],
                    **self._guidance(len(rows)),
                    num_inference_steps=step.steps,
                    **{self.call.guidance_argument: step.guidance},
                    width=step.width,
                    height=step.height,
                    generator=[torch.Generator("cpu").manual_seed(seed) for _, seed in rows],
                    output_type="np",
                    **extra,
                )
        finally:
            torch.set_num_threads(previous)
            if not col.fused and getattr(self.pipe, "get_list_adapters", lambda: {})():
                self.pipe.enable_lora()
        if step.frames:  # (clips, frames, h, w, 3) -> one strip per clip
            return [np.concatenate(list(clip), axis=1) for clip in result.frames]
        return list(result.images)

    def _keep(self, index: int, batch: int, floats: list[Any], diff: float | None = None) -> None:
        import numpy as np
        from PIL import Image

        images = [Image.fromarray(np.clip(np.round(a * 255), 0, 255).astype("uint8")) for a in floats]
        self.images[(index, batch)] = images
        self.rendered += len(images)
        self.cache.put(self.keys[(index, batch)], CachedBatch(images, diff))

    def render_unfused(self) -> None:
        for index, batch in sorted(self.pending):
            col = self.columns[index]
            if col.fused:
                continue
            floats = self._render(col, batch)
            if col.hidden:
                self._runtime[batch] = floats
            else:
                self._keep(index, batch, floats)

    def render_fused(self) -> None:
        import numpy as np

        for index, batch in sorted(self.pending):
            if self.columns[index].fused:
                floats = self._render(self.columns[index], batch)
                runtime = self._runtime.pop(batch)
                diff = float(max(np.abs(a - b).max() for a, b in zip(floats, runtime, strict=True)))
                self.diffs[batch] = diff
                self._keep(index, batch, floats, diff)

    # -- output -------------------------------------------------------------------------------
    def _shown(self, cell: Any) -> Any:
        """A cell as the grid shows it: a video's frame strip enlarged so each frame is at least 128 px."""
        if not self.step.frames:
            return cell
        return frame_strip(strip_frames(cell, self.step.frames))

    def _cell(self, index: int, row: int) -> Any:
        batch = row // BATCH
        return self.images[(index, batch)][row - self.batches[batch][0]]

    def write(self, final: Path, metadata: dict[str, str]) -> GridResult:
        visible = [(i, c) for i, c in enumerate(self.columns) if not c.hidden]
        result = GridResult(final)
        if any(c.fused for _, c in visible) and self.diffs:
            result.fused_vs_runtime_max_diff = max(self.diffs.values())
        words = any(c.words for _, c in visible)
        row_labels = [
            f"{p}\nseed {s}" + ("\n(+ the column's trigger words)" if words else "") for p, s in self.rows
        ]
        cells = [[self._shown(self._cell(i, r)) for i, _ in visible] for r in range(len(self.rows))]
        title = (
            f"{self.plan.name} {self.plan.build}".strip()
            + f"  {metadata.get('lorarecipe.fingerprint', '')[:19]}"
        )
        grid = compose_grid(cells, row_labels, [c.header for _, c in visible], title)
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
                        "prompt": self._prompt(col, prompt),
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
                        "lorarecipe.threads": str(self.step.threads),
                    }
                    (tmp / name).write_bytes(png_bytes(self._cell(i, r), chunks))
                    if self.step.frames:
                        video = name.removesuffix(".png") + ".webp"
                        frames = strip_frames(self._cell(i, r), self.step.frames)
                        (tmp / video).write_bytes(webp_bytes(frames))
                        doc["video"] = f"{cells_dir.name}/{video}"
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
            "threads": self.step.threads,
            **({"frames": self.step.frames} if self.step.frames else {}),
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
