"""What a build records about itself: model cards, the manifest, and provenance metadata.

Build state -> ``README.md`` cards in pipeline/LoRA folders and ``manifest.json``. While a build
replaces outputs, the previous manifest is moved aside (``.lorarecipe/previous-manifest.json``) so
that a build that fails or is killed half-way never leaves a manifest describing files that are
gone; the new manifest carries over the entries of outputs that were up to date.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..fs.atomic import fsync_dir
from ..fs.hashing import sha256_file, sha256_text
from ..outputs.manifest import MANIFEST_NAME, PREVIOUS_MANIFEST, file_entry, library_versions, write_manifest
from ..plan import CheckpointLayout, MergeAdapters, OutputStep, Plan, RenderGrid, SaveCheckpoint, SaveLora
from .build_state import BuildState
from .inputs import ResolvedInput
from .step_context import step_context

__all__ = ["finish_manifest", "provenance", "set_aside_manifest", "write_cards"]


def provenance(plan: Plan, recipe_text: str) -> dict[str, str]:
    """Metadata stamped into every safetensors output and PNG."""
    from .. import __version__

    return {
        "lorarecipe.version": __version__,
        "lorarecipe.recipe_name": plan.name,
        "lorarecipe.build": plan.build,
        "lorarecipe.fingerprint": plan.fingerprint(),
        "lorarecipe.recipe": recipe_text,
    }


def _input_doc(step_id: str, resolved: ResolvedInput) -> dict[str, Any]:
    path = resolved.path
    files = (
        sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if path.is_dir()
        else [path]
    )
    entries = []
    for file in files:
        rel = file.relative_to(path).as_posix() if path.is_dir() else file.name
        entries.append({"path": rel, "sha256": sha256_file(file), "size": file.stat().st_size})
    source = resolved.source
    return {
        "step": step_id,
        "kind": source.kind,
        "ref": source.ref,
        "filename": source.filename,
        "requested_revision": source.revision,
        "resolved_commit": resolved.commit,
        "files": entries,
    }


def write_cards(plan: Plan, state: BuildState, recipe_text: str) -> None:
    """README.md model card (+ the first grid, copied in) for every written pipeline/LoRA folder."""
    grids = [g for g in plan.of_type(RenderGrid) if g.output in state.outputs]
    for step in plan.steps:
        if (
            not isinstance(step, (SaveCheckpoint, SaveLora))
            or not step.card
            or step.output not in state.outputs
        ):
            continue
        if isinstance(step, SaveCheckpoint) and step.layout is not CheckpointLayout.DIFFUSERS:
            continue  # a single file has no folder to hold a card
        with step_context(step):  # a disk error here is reported at the output's recipe line
            _write_card(plan, state, recipe_text, step, grids[0] if grids else None)


def _write_card(
    plan: Plan,
    state: BuildState,
    recipe_text: str,
    step: SaveCheckpoint | SaveLora,
    grid: RenderGrid | None,
) -> None:
    from .. import __version__
    from ..fs.atomic import atomic_write_bytes, atomic_write_text
    from ..fs.paths import resolve_output
    from ..outputs.modelcard import CardInput, render_card

    out_root = state.options.out_root
    folder = resolve_output(out_root, step.path)
    meta = dict(plan.meta)
    card = CardInput(
        recipe_text=recipe_text,
        version=__version__,
        description=meta.get("description"),
        license=meta.get("license"),
        base_commit=state.inputs["base"].commit,
        adapter_sha256={name: sha256_file(path) for name, path in state.adapter_paths().items()},
    )
    if grid is not None:
        image = folder / "images" / Path(grid.path).name
        atomic_write_bytes(image, resolve_output(out_root, grid.path).read_bytes())
        card.grid_path = f"images/{image.name}"
        card.grid_caption = grid_caption(grid)
        state.outputs[step.output].files.append(image)
    readme = folder / "README.md"
    atomic_write_text(readme, render_card(plan, step, card))
    state.outputs[step.output].files.append(readme)


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


def _carry_over(out_root: Path, plan: Plan, built: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Outputs of this build plus the previous manifest's entries for outputs that were up to date.

    Each entry keeps the fingerprint of the plan that built it, so a manifest after an incremental
    build still says which recipe produced every file.
    """
    wanted = {s.output for s in plan.output_steps()}
    previous: dict[str, Any] = {}
    source = out_root / PREVIOUS_MANIFEST
    if not source.is_file():
        source = out_root / MANIFEST_NAME
    try:
        doc = json.loads(source.read_text(encoding="utf-8"))
        previous = doc.get("outputs", {}) if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        previous = {}
    merged = {k: v for k, v in previous.items() if k in wanted and k not in built and isinstance(v, dict)}
    fingerprint = plan.fingerprint()
    for name, doc in built.items():
        merged[name] = {**doc, "built_by_fingerprint": fingerprint}
    return dict(sorted(merged.items()))


def _output_kind(step: OutputStep) -> str:
    if isinstance(step, SaveCheckpoint):
        return "pipeline" if step.layout is CheckpointLayout.DIFFUSERS else "single_file"
    if isinstance(step, SaveLora):
        return "lora"
    return "grid"


def set_aside_manifest(out_root: Path) -> None:
    """Move manifest.json aside before outputs are replaced (kept if a killed build already did)."""
    current, aside = out_root / MANIFEST_NAME, out_root / PREVIOUS_MANIFEST
    try:
        if current.is_file():
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(current, aside)
            fsync_dir(out_root)
    except OSError as exc:
        raise BuildError(f"cannot set aside {current}: {exc.strerror or exc}") from None


def finish_manifest(plan: Plan, state: BuildState, recipe_text: str) -> tuple[Path, dict[str, Any]]:
    """Hash every written file and write manifest.json (last); returns it and the built outputs."""
    out_root = state.options.out_root
    try:
        built: dict[str, dict[str, Any]] = {}
        for step in plan.output_steps():
            record = state.outputs.get(step.output)
            if record is None:
                continue
            doc: dict[str, Any] = {
                "kind": _output_kind(step),
                "executor": record.executor,
                "path": step.path,
                "step": step.key(),
                "files": [file_entry(p, out_root) for p in record.files],
            }
            if isinstance(step, RenderGrid):
                doc["fused_vs_runtime_max_abs_diff"] = record.fused_vs_runtime_max_diff
            built[step.output] = doc
        seeds: dict[str, Any] = {s.id: s.seed for s in plan.of_type(MergeAdapters)}
        seeds.update({s.id: list(s.seeds) for s in plan.of_type(RenderGrid)})
        manifest = {
            "recipe": {
                "path": plan.recipe,
                "name": plan.name,
                "build": plan.build,
                "sha256": sha256_text(recipe_text),
                "text": recipe_text,
                "variables": dict(plan.variables),
            },
            "plan": plan.to_json(),
            "fingerprint": plan.fingerprint(),
            "inputs": [_input_doc(k, v) for k, v in state.inputs.items()],
            "outputs": _carry_over(out_root, plan, built),
            "seeds": seeds,
            "device": state.options.device,
            "dtypes": {"pipeline": state.dtype},
            "libraries": library_versions(),
            "checks": {
                "fuse": {
                    name: record.fuse.to_json()
                    for name, record in sorted(state.outputs.items())
                    if record.fuse is not None
                },
                "adapters": state.adapters,
            },
            "timings_seconds": {k: round(v, 3) for k, v in state.timings.items()},
        }
        path = write_manifest(out_root, manifest)
        (out_root / PREVIOUS_MANIFEST).unlink(missing_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot write {out_root / MANIFEST_NAME}: {exc.strerror or exc}") from None
    return path, built
