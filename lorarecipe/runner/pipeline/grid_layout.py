"""A grid's layout: its columns (the recipe's variants), its rows (prompt × seed) and its batches.

RenderGrid step + plan -> ``GridLayout``: the columns in order (with the hidden runtime equivalent of
``fused``), the rows, and the batches of rows rendered together (one column × up to ``BATCH`` rows:
the unit whose pixels are reproducible, and the unit of the cell cache and of grid shards). Plain
data from the plan only: the renderer (``grids``) and the Ray driver, which must not import torch,
both read it, so a shard's (column, batch) units are the ones a whole build renders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...plan import FuseAdapters, Plan, RenderGrid, SetAdapters
from ...plan.view import describe_weight

__all__ = ["BATCH", "Column", "GridLayout"]

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

    @property
    def header(self) -> str:
        """The grid's column header: the label, and the trigger words each of its cells' prompts starts
        with (the row label gives the rest of the prompt)."""
        return self.label + ("\nprompt: " + ", ".join(self.words) + ", …" if self.words else "")


class GridLayout:
    """Columns, rows and batches of one grid of a plan."""

    def __init__(self, plan: Plan, step: RenderGrid) -> None:
        self.step = step
        self.words = dict(step.trigger_words)
        mixes = plan.of_type(SetAdapters)
        fuses = plan.of_type(FuseAdapters)
        self.mix: SetAdapters | None = mixes[0] if mixes else None
        self.fuse: FuseAdapters | None = fuses[0] if fuses else None
        self.columns = self._columns()
        self.rows = [(p, s) for p in step.prompts for s in step.seeds]
        self.batches = [
            list(range(i, min(i + BATCH, len(self.rows)))) for i in range(0, len(self.rows), BATCH)
        ]

    def units(self) -> list[tuple[int, int]]:
        """The visible (column, batch) pairs, batch by batch: what a shard renders (a ``fused`` unit
        brings its hidden runtime-equivalent batch along)."""
        visible = [i for i, c in enumerate(self.columns) if not c.hidden]
        return [(i, b) for b in range(len(self.batches)) for i in visible]

    def cells(self, unit: tuple[int, int]) -> int:
        return len(self.batches[unit[1]])

    def _words(self, adapters: tuple[str, ...]) -> tuple[str, ...]:
        out: list[str] = []
        for name in adapters:
            out.extend(w for w in self.words.get(name, ()) if w not in out)
        return tuple(out)

    def _column(self, label: str, variant: str, adapters: tuple[str, ...], **kw: Any) -> Column:
        return Column(label, variant, adapters, words=self._words(adapters), **kw)

    def _columns(self) -> list[Column]:
        step, cols = self.step, []
        for variant in step.variants:
            if variant == "base":
                cols.append(Column("base (LoRA off)", "base"))
            elif variant == "mix" and self.mix:
                desc = ", ".join(
                    f"{n} {describe_weight(w)}"
                    for n, w in zip(self.mix.adapters, self.mix.weights, strict=True)
                )
                cols.append(self._column(f"mix: {desc}", "mix", self.mix.adapters, weights=self.mix.weights))
            elif variant == "fused" and self.fuse:
                cols.append(
                    self._column(
                        f"fused (lora_scale {self.fuse.lora_scale:g})",
                        "fused",
                        self.fuse.adapters,
                        fused=True,
                    )
                )
            else:
                cols.append(self._column(variant, variant, (variant,), weights=(1.0,)))
        base_adapters = self.mix.adapters if self.mix else ()
        base_weights = self.mix.weights if self.mix else ()
        if step.sweep_adapter and step.sweep_weights:
            for w in step.sweep_weights:
                names = list(base_adapters) if step.sweep_adapter in base_adapters else [step.sweep_adapter]
                weights = [
                    w if n == step.sweep_adapter else base_weights[base_adapters.index(n)] for n in names
                ]
                label = f"{'mix, ' if len(names) > 1 else ''}{step.sweep_adapter} = {w:g}"
                cols.append(self._column(label, "sweep", tuple(names), weights=tuple(weights)))
        if step.sweep_lora_scale:
            source = self.mix or self.fuse
            if source is not None:
                for s in step.sweep_lora_scale:
                    cols.append(
                        self._column(
                            f"lora_scale = {s:g}", "sweep", source.adapters, weights=source.weights, scale=s
                        )
                    )
        if self.fuse and any(c.fused for c in cols):
            cols.append(
                self._column(
                    "fused (runtime equivalent)",
                    "fused-runtime",
                    self.fuse.adapters,
                    weights=self.fuse.weights,
                    scale=self.fuse.lora_scale,
                    hidden=True,
                )
            )
        return cols
