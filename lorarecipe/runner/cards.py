"""Model cards: a ``README.md`` in every pipeline and LoRA folder, written before the folder is swapped in.

Plan + build state -> the card of one output folder (``card_writer``: called on the temporary folder,
so a folder at its final path always has its card), then, once the build's first grid is rendered,
that grid copied into each card folder built in this run and the card rewritten to show it
(``add_grid_to_cards``; each file replaced atomically, the manifest journal told).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..fs.atomic import atomic_write_bytes, atomic_write_text
from ..fs.hashing import path_digest
from ..fs.paths import resolve_output
from ..plan import CheckpointLayout, OutputStep, Plan, RenderGrid, SaveCheckpoint, SaveLora
from .build_state import BuildState
from .journal import ManifestJournal
from .step_context import step_context

__all__ = ["add_grid_to_cards", "card_writer"]


def _has_card(step: OutputStep) -> bool:
    if isinstance(step, SaveCheckpoint):
        return step.card and step.layout is CheckpointLayout.DIFFUSERS  # a single file has no folder
    return isinstance(step, SaveLora) and step.card


def _render(
    plan: Plan, state: BuildState, recipe_text: str, step: OutputStep, grid: RenderGrid | None
) -> str:
    from .. import __version__
    from ..outputs.modelcard import CardInput, render_card

    assert isinstance(step, (SaveCheckpoint, SaveLora))
    meta = dict(plan.meta)
    card = CardInput(
        recipe_text=recipe_text,
        version=__version__,
        description=meta.get("description"),
        license=meta.get("license"),
        base_commit=state.inputs["base"].commit,
        # a checkpoint difference is a folder: the digest of its files (a file's is its sha256)
        adapter_sha256={name: path_digest(path) or "" for name, path in state.adapter_paths().items()},
    )
    if grid is not None:
        card.grid_path = f"images/{Path(grid.path).name}"
        card.grid_caption = grid_caption(grid)
    return render_card(plan, step, card)


def card_writer(plan: Plan, state: BuildState, recipe_text: str) -> Callable[[OutputStep, Path], None]:
    """``write(step, folder)``: the card of ``step``'s output into ``folder`` (no grid yet)."""

    def write(step: OutputStep, folder: Path) -> None:
        if _has_card(step):
            atomic_write_text(folder / "README.md", _render(plan, state, recipe_text, step, None))

    return write


def add_grid_to_cards(plan: Plan, state: BuildState, recipe_text: str, journal: ManifestJournal) -> None:
    """Copy the first grid rendered in this build into each card folder built in this build, and
    show it in the card (the image first, then the card, each atomic)."""
    grids = [g for g in plan.of_type(RenderGrid) if g.output in state.outputs]
    if not grids:
        return
    grid = grids[0]
    out_root = state.options.out_root
    for step in plan.output_steps():
        if not _has_card(step) or step.output not in state.outputs:
            continue
        with step_context(step):  # a disk error here is reported at the output's recipe line
            folder = resolve_output(out_root, step.path)
            image = folder / "images" / Path(grid.path).name
            readme = folder / "README.md"
            entry = journal.unlist(step.output)  # a kill from here on leaves it unlisted, not wrong
            atomic_write_bytes(image, resolve_output(out_root, grid.path).read_bytes())
            atomic_write_text(readme, _render(plan, state, recipe_text, step, grid))
            journal.relist(step.output, entry, [image, readme])
            files = state.outputs[step.output].files
            files.extend(p for p in (image, readme) if p not in files)


def grid_caption(grid: RenderGrid) -> str:
    """The card's line under the sample grid: its rows, every column (the sweep's too) and settings."""
    columns = list(grid.variants)
    if grid.sweep_adapter and grid.sweep_weights:
        columns += [f"{grid.sweep_adapter} = {w:g}" for w in grid.sweep_weights]
    if grid.sweep_lora_scale:
        columns += [f"lora_scale = {s:g}" for s in grid.sweep_lora_scale]
    size = f", {grid.width}×{grid.height}" if grid.width and grid.height else ""
    return (
        f"Rows: prompt × seed; columns: {', '.join(columns)} "
        f"({grid.steps} steps, guidance {grid.guidance:g}{size})."
    )
