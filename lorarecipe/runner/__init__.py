"""Runner: a compiled :class:`~lorarecipe.plan.Plan` -> output files and ``manifest.json``.

``run_plan`` takes the output root's lock (a second build into the same root is refused), removes
leftovers of killed builds, runs the executors, and writes the manifest last. This is the only
stage that imports torch, diffusers and peft (lazily, inside the executors).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import clean_stale_temporaries
from ..errors import LockError
from ..hashing import sha256_file, sha256_text
from ..manifest import file_entry, library_versions, write_manifest
from ..plan import LoadAdapter, MergeAdapters, Plan, RenderGrid, SaveCheckpoint, SaveLora
from .progress import Reporter, make_reporter
from .resolve import ResolvedInput

__all__ = ["BuildResult", "run_plan"]

LOCK_NAME = ".lorarecipe/build.lock"


@dataclass
class BuildResult:
    plan: Plan
    out_root: Path
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    written: dict[str, list[Path]] = field(default_factory=dict)
    manifest: Path | None = None
    device: str = "cpu"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


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


def _write_cards(plan: Plan, run: Any, out_root: Path, recipe_text: str) -> None:
    """README.md model card (+ the first grid, copied in) for every written pipeline/LoRA folder."""
    from .. import __version__
    from ..atomic import atomic_write_bytes, atomic_write_text
    from ..modelcard import CardInput, render_card
    from ..paths import resolve_output

    grids = [g for g in plan.of_type(RenderGrid) if g.output in run.grids]
    for step in plan.steps:
        if (
            not isinstance(step, (SaveCheckpoint, SaveLora))
            or not step.card
            or step.output not in run.written
        ):
            continue
        if isinstance(step, SaveCheckpoint) and step.layout != "diffusers":
            continue
        folder = resolve_output(out_root, step.path)
        meta = dict(plan.meta)
        card = CardInput(
            recipe_text=recipe_text,
            version=__version__,
            description=meta.get("description"),
            license=meta.get("license"),
            base_commit=run.inputs["base"].commit,
            adapter_sha256={
                k.split(":", 1)[1]: sha256_file(v.path)
                for k, v in run.inputs.items()
                if k.startswith("adapter:")
            },
        )
        if grids:
            grid = grids[0]
            image = folder / "images" / Path(grid.path).name
            atomic_write_bytes(image, resolve_output(out_root, grid.path).read_bytes())
            card.grid_path = f"images/{image.name}"
            card.grid_caption = (
                f"Rows: prompt × seed; columns: {', '.join(grid.variants)} ({grid.steps} steps)."
            )
            run.written[step.output].append(image)
        readme = folder / "README.md"
        atomic_write_text(readme, render_card(plan, step, card))
        run.written[step.output].append(readme)


def _carry_over(out_root: Path, plan: Plan, built: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Outputs of this build plus the previous manifest's entries for outputs that were up to date.

    Each entry keeps the fingerprint of the plan that built it, so a manifest after an incremental
    build still says which recipe produced every file.
    """
    import json

    from ..manifest import MANIFEST_NAME

    wanted = {s.output for s in plan.steps if hasattr(s, "output")}  # type: ignore[attr-defined]
    previous: dict[str, Any] = {}
    try:
        doc = json.loads((out_root / MANIFEST_NAME).read_text(encoding="utf-8"))
        previous = doc.get("outputs", {}) if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        previous = {}
    merged = {k: v for k, v in previous.items() if k in wanted and k not in built and isinstance(v, dict)}
    fingerprint = plan.fingerprint()
    for name, doc in built.items():
        merged[name] = {**doc, "built_by_fingerprint": fingerprint}
    return dict(sorted(merged.items()))


def _output_kind(step: Any) -> str:
    if isinstance(step, SaveCheckpoint):
        return "pipeline" if step.layout == "diffusers" else "single_file"
    if isinstance(step, SaveLora):
        return "lora"
    return "grid"


def run_plan(
    plan: Plan,
    *,
    out_root: Path,
    recipe_root: Path,
    recipe_text: str,
    device: str = "auto",
    allow_read: Sequence[Path] = (),
    reporter: Reporter | None = None,
    outputs: set[str] | None = None,
    resolved: Mapping[str, ResolvedInput] | None = None,
) -> BuildResult:
    """Build ``outputs`` (default: all) of ``plan`` into ``out_root``; returns what was written."""
    from filelock import FileLock, Timeout

    from .quiet import quiet_libraries

    quiet_libraries()
    from .device import pick_device
    from .pipeline_executor import ExecOptions, run_with_pipeline

    started = time.perf_counter()
    reporter = reporter or make_reporter(quiet=True)
    (out_root / LOCK_NAME).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out_root / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise LockError(
            f"another lorarecipe build is writing to {out_root}; wait for it or use another --out"
        ) from None
    try:
        clean_stale_temporaries(out_root)
        chosen = pick_device(device)
        wanted = outputs if outputs is not None else {s.output for s in plan.steps if hasattr(s, "output")}
        total = 1 + len(plan.of_type(LoadAdapter)) + len(plan.of_type(MergeAdapters)) + 2 * len(wanted) + 1
        reporter.begin(f"build {plan.name}" + (f" [{plan.build}]" if plan.build else ""), total)
        options = ExecOptions(
            out_root=out_root,
            recipe_root=recipe_root,
            device=chosen,
            allow_read=tuple(allow_read),
            reporter=reporter,
            provenance=provenance(plan, recipe_text),
            outputs=set(wanted),
            resolved=dict(resolved or {}),
        )
        run = run_with_pipeline(plan, options)
        _write_cards(plan, run, out_root, recipe_text)
        result = BuildResult(plan, out_root, device=chosen, written=run.written)
        for step in plan.steps:
            name = getattr(step, "output", None)
            if name is None or name not in run.written:
                continue
            doc: dict[str, Any] = {
                "kind": _output_kind(step),
                "path": step.path,  # type: ignore[attr-defined]
                "step": step.key(),
                "files": [file_entry(p, out_root) for p in run.written[name]],
            }
            if isinstance(step, RenderGrid) and name in run.grids:
                doc["fused_vs_runtime_max_abs_diff"] = run.grids[name].fused_vs_runtime_max_diff
            result.outputs[name] = doc
        reporter.step("write manifest")
        seeds = {s.id: s.seed for s in plan.of_type(MergeAdapters)}
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
            "inputs": [_input_doc(k, v) for k, v in run.inputs.items()],
            "outputs": _carry_over(out_root, plan, result.outputs),
            "seeds": seeds,
            "device": chosen,
            "dtypes": {"pipeline": run.dtype},
            "libraries": library_versions(),
            "checks": {
                "fuse": vars(run.fuse) if run.fuse else None,
                "adapters": {n: a.modules for n, a in run.adapters.items()},
            },
            "timings_seconds": {k: round(v, 3) for k, v in run.timings.items()},
        }
        result.manifest = write_manifest(out_root, manifest)
        result.seconds = time.perf_counter() - started
        reporter.end()
        return result
    finally:
        lock.release()
