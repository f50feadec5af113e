"""What a build records about itself: provenance metadata and the manifest's content.

Plan + recipe text -> the metadata stamped into every safetensors file and PNG (``provenance``);
a built output -> its manifest entry (``output_entry``); build state -> the final manifest.json,
written through the manifest journal (``journal``) that kept it true while the build ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fs.hashing import sha256_file, sha256_text
from ..outputs.manifest import library_versions
from ..plan import CheckpointLayout, MergeAdapters, OutputStep, Plan, RenderGrid, SaveCheckpoint, SaveLora
from .build_state import BuildState, OutputRecord
from .inputs import ResolvedInput
from .journal import ManifestJournal

__all__ = ["finish_manifest", "output_entry", "provenance"]


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


def _output_kind(step: OutputStep) -> str:
    if isinstance(step, SaveCheckpoint):
        return "pipeline" if step.layout is CheckpointLayout.DIFFUSERS else "single_file"
    if isinstance(step, SaveLora):
        return "lora"
    return "grid"


def output_entry(plan: Plan, step: OutputStep, record: OutputRecord) -> dict[str, Any]:
    """An output's manifest entry (without its files): kind, executor, path, the step's key, the key of
    its part of the plan (``lorarecipe publish`` checks it), and the fingerprint of the plan that built it."""
    entry: dict[str, Any] = {
        "kind": _output_kind(step),
        "executor": record.executor,
        "path": step.path,
        "step": step.key(),
        "plan_part": plan.part_key(step.id),
        "built_by_fingerprint": plan.fingerprint(),
    }
    if isinstance(step, RenderGrid):
        entry["fused_vs_runtime_max_abs_diff"] = record.fused_vs_runtime_max_diff
        entry["compiled"] = record.compiled  # None: eager; "regional": through a compiled denoiser
    return entry


def finish_manifest(
    plan: Plan,
    state: BuildState,
    recipe_text: str,
    journal: ManifestJournal,
    worker: dict[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write the final manifest.json (last): the recipe, plan, inputs, checks and every listed output,
    and the worker that built them (``worker``: host, pid, Ray ids, pipeline loaded or reused);
    returns it and the entries of the outputs built in this run."""
    seeds: dict[str, Any] = {s.id: s.seed for s in plan.of_type(MergeAdapters)}
    seeds.update({s.id: list(s.seeds) for s in plan.of_type(RenderGrid)})
    doc = {
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
        "seeds": seeds,
        "device": state.options.device,
        "threads": state.options.threads.to_json() if state.options.threads else None,
        "dtypes": {"pipeline": state.dtype},
        "libraries": library_versions(),
        "checks": {
            "fuse": {
                name: record.fuse.to_json()
                for name, record in sorted(state.outputs.items())
                if record.fuse is not None
            },
            "adapters": state.adapters,
            **({"extract": state.extractions} if state.extractions else {}),
        },
        "timings_seconds": {k: round(v, 3) for k, v in state.timings.items()},
        "worker": worker,
    }
    path = journal.finish(doc)
    built = {name: journal.outputs[name] for name in state.outputs if name in journal.outputs}
    return path, built
