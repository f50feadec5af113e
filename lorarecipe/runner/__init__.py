"""Runner: a compiled :class:`~lorarecipe.plan.Plan` -> output files and ``manifest.json``.

``run_plan`` takes the output root's lock (a second build into the same root is refused), removes
leftovers of killed builds, sets the previous manifest aside, runs the executors, writes model
cards, and writes the manifest last (``records``). This is the only
stage that imports torch, diffusers and peft (lazily, inside the executors).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import clean_stale_temporaries
from ..errors import BuildError, LockError
from ..plan import LoadAdapter, MergeAdapters, Plan
from .progress import Reporter, make_reporter
from .records import finish_manifest, provenance, set_aside_manifest, write_cards
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
    on_success: Callable[[dict[str, list[Path]]], None] | None = None,
    executor: str = "auto",
) -> BuildResult:
    """Build ``outputs`` (default: all) of ``plan`` into ``out_root``; returns what was written.

    ``on_success(written)`` runs after the manifest, still under the output root's lock (the
    incremental-build state is recorded there, so no other build can interleave).
    """
    from filelock import FileLock, Timeout

    from .quiet import quiet_libraries

    quiet_libraries()
    from .device import pick_device
    from .pipeline_executor import ExecOptions, PipelineRun, resolve_inputs, run_with_pipeline
    from .stream_route import stream_checkpoints

    started = time.perf_counter()
    out_root = Path(os.path.abspath(out_root))  # written paths are absolute; a relative --out must match
    reporter = reporter or make_reporter(quiet=True)
    try:
        (out_root / LOCK_NAME).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(out_root / LOCK_NAME))
        lock.acquire(timeout=0)
    except Timeout:
        raise LockError(
            f"another lorarecipe build is writing to {out_root}; wait for it or use another --out"
        ) from None
    except OSError as exc:
        raise BuildError(f"cannot use the output folder {out_root}: {exc.strerror or exc}") from None
    try:
        try:
            clean_stale_temporaries(out_root)
        except OSError as exc:
            raise BuildError(f"cannot clean {out_root}: {exc.strerror or exc}") from None
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
        set_aside_manifest(out_root)
        run = PipelineRun()
        resolve_inputs(plan, options, run)
        streamed = stream_checkpoints(plan, options, run, executor)
        options.outputs -= streamed  # what is left needs the pipeline (grids, LoRA files, fallbacks)
        run_with_pipeline(plan, options, run)
        for name in wanted:
            run.executors.setdefault(name, "diffusers")
        write_cards(plan, run, out_root, recipe_text)
        reporter.step("write manifest")
        manifest, built = finish_manifest(plan, run, out_root, recipe_text, chosen)
        result = BuildResult(
            plan, out_root, outputs=built, written=run.written, manifest=manifest, device=chosen
        )
        if on_success is not None:
            on_success(run.written)
        result.seconds = time.perf_counter() - started
        reporter.end()
        return result
    finally:
        lock.release()
