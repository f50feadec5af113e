"""Stage 4, runner: a compiled :class:`~lorarecipe.plan.Plan` -> output files and ``manifest.json``.

``run_plan`` takes the output root's lock (a second build into the same root is refused), removes
leftovers of killed builds, sets the previous manifest aside, resolves every input once, then hands
the outputs to the executors of the ``--executor`` mode in order (``executor``: streaming, then the
diffusers pipeline), each building what it can into one typed ``BuildState`` (``build_state``); it
writes model cards and the manifest last (``records``). This is the only stage that imports torch,
diffusers and peft (lazily, inside the executors).

The package: ``executor`` (the interface and the registry), ``build_state``, ``inputs`` (sources ->
local files), ``step_context`` (failures located at recipe lines), ``fuse_math`` (the one fused-tensor
formula), ``pipeline/`` and ``streaming/`` (the two executors), ``records``, and ``device``,
``quiet``, ``progress``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BuildError, LockError, UsageError
from ..fs.atomic import clean_stale_temporaries
from ..fs.paths import check_output_root, check_outputs_apart, resolve_output
from ..outputs.manifest import BUILD_LOCK, MANIFEST_NAME
from ..plan import LoadAdapter, LoadBase, Plan
from .build_state import BuildOptions, BuildState, OutputRecord
from .cards import add_grid_to_cards, card_writer
from .inputs import ResolvedInput, resolve_adapter, resolve_base, resolve_config
from .journal import ManifestJournal
from .progress import Reporter, make_reporter
from .records import finish_manifest, output_entry, provenance
from .step_context import step_context
from .worker import worker_identity, worker_label

if TYPE_CHECKING:
    from .pipeline.warm import WarmPipelines

__all__ = ["LOCK_NAME", "BuildResult", "render_grid_cells", "require_build_extra", "run_plan"]

LOCK_NAME = BUILD_LOCK  # the output root's lock, relative to the root


@dataclass
class BuildResult:
    plan: Plan
    out_root: Path
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    written: dict[str, list[Path]] = field(default_factory=dict)
    manifest: Path | None = None
    device: str = "cpu"
    seconds: float = 0.0
    worker: dict[str, Any] = field(default_factory=dict)  # who built it (manifest ``worker``)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count for the executors, restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def require_build_extra() -> None:
    """A clear usage error instead of an ImportError when the [build] extra is not installed."""
    import importlib.util

    modules = ("torch", "diffusers", "peft", "transformers", "safetensors", "PIL", "filelock")
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"this command needs {', '.join(missing)}: install torch for your machine, then "
            "pip install 'lorarecipe[build]'"
        )


def _resolve_inputs(plan: Plan, state: BuildState, pinned: Mapping[str, ResolvedInput]) -> None:
    """Every input as a local path (built-in, local, hub download/cache) into ``state.inputs``, and
    the config folder of a single-file base; ``pinned`` inputs (``--frozen``) are used as given."""
    options = state.options
    base = plan.step("base")
    assert isinstance(base, LoadBase)
    with state.step(base, "resolve base"):
        state.inputs["base"] = pinned.get("base") or resolve_base(
            base.source,
            options.recipe_root,
            options.allow_read,
            variant=base.variant,
            single_file=base.single_file,
        )
        config = pinned.get("base:config")
        state.config = (
            config.path
            if config is not None
            else resolve_config(base.config, options.recipe_root, options.allow_read)
        )
    for step in plan.of_type(LoadAdapter):
        with state.step(step, f"resolve adapter {step.name}"):
            resolve = resolve_base if step.difference else resolve_adapter  # a checkpoint is a folder
            state.inputs[step.id] = pinned.get(step.id) or resolve(
                step.source, options.recipe_root, options.allow_read
            )


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
    protected: Sequence[Path] = (),
    pipelines: WarmPipelines | None = None,
    threads: int | None = None,
    worker_notes: Mapping[str, Any] | None = None,
) -> BuildResult:
    """Build ``outputs`` (default: all) of ``plan`` into ``out_root``; returns what was written.

    ``executor`` is a mode of :data:`~lorarecipe.runner.executor.EXECUTOR_MODES`. ``on_success(written)``
    runs after the manifest, still under the output root's lock (the incremental-build state is
    recorded there, so no other build can interleave). ``protected``: files no output may replace or
    contain besides the inputs (the recipe, its lock). ``threads``: torch's intra-op threads
    (default: :func:`~lorarecipe.runner.device.thread_policy`), recorded in the manifest.
    ``pipelines``: the worker's warm pipeline cache (a batch passes one so that builds of the same
    base share one load); default: load afresh. ``worker_notes``: more about where the build's work
    ran (its grid shards), recorded in the manifest's ``worker``.
    """
    from filelock import FileLock, Timeout

    from .quiet import quiet_libraries

    quiet_libraries()
    from .device import pick_device, thread_policy
    from .executor import executors_for
    from .pipeline.warm import WarmPipelines

    pool = pipelines or WarmPipelines(keep=False)
    loads, reuses = pool.loads, pool.reuses
    identity = worker_identity()

    started = time.perf_counter()
    check_output_root(out_root)
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
        policy = thread_policy(threads)
        wanted = [s.output for s in plan.output_steps() if outputs is None or s.output in outputs]
        reporter.begin(f"build {plan.name}" + (f" [{plan.build}]" if plan.build else ""))
        options = BuildOptions(
            out_root=out_root,
            recipe_root=recipe_root,
            device=chosen,
            allow_read=tuple(allow_read),
            reporter=reporter,
            provenance=provenance(plan, recipe_text),
            threads=policy,
        )
        state = BuildState(options)
        _resolve_inputs(plan, state, resolved or {})
        inputs = [r.path for r in state.inputs.values()] + ([state.config] if state.config else [])
        check_outputs_apart([out_root / ".lorarecipe", out_root / MANIFEST_NAME], [*inputs, *protected])
        for name in wanted:
            step = plan.output_step(name)
            with step_context(step):  # located at the output's recipe line
                check_outputs_apart([resolve_output(out_root, step.path)], [*inputs, *protected])
        journal = ManifestJournal(out_root, [s.output for s in plan.output_steps()])
        journal.forget(wanted)  # from here on a kill leaves them unlisted until they are complete again

        def record(name: str, built: OutputRecord) -> None:
            entry = output_entry(plan, plan.output_step(name), built)
            entry["worker"] = worker_label(identity)
            journal.record(name, entry, built.files, built.hashes)

        state.on_output = record
        state.card_writer = card_writer(plan, state, recipe_text)
        left = wanted
        with _torch_threads(policy.threads):
            for runner in executors_for(executor, pool):
                if not left:
                    break
                left = runner.build(plan, left, state)
        if left:
            raise BuildError(f"internal: no executor built {', '.join(left)}")
        add_grid_to_cards(plan, state, recipe_text, journal)
        reporter.step("write manifest")
        usage = {"loaded": pool.loads - loads, "reused": pool.reuses - reuses, "worker_loads": pool.loads}
        worker = {**identity, "pipeline": usage, **(worker_notes or {})}
        manifest, built = finish_manifest(plan, state, recipe_text, journal, worker)
        written = state.files()
        result = BuildResult(
            plan, out_root, outputs=built, written=written, manifest=manifest, device=chosen, worker=worker
        )
        if on_success is not None:
            on_success(written)
        result.seconds = time.perf_counter() - started
        reporter.end()
        return result
    finally:
        lock.release()


def render_grid_cells(
    plan: Plan,
    output: str,
    units: set[tuple[int, int]],
    *,
    recipe_root: Path,
    device: str = "auto",
    allow_read: Sequence[Path] = (),
    resolved: Mapping[str, ResolvedInput] | None = None,
    pipelines: WarmPipelines | None = None,
    threads: int | None = None,
) -> int:
    """A grid shard: render the (column, batch) ``units`` of grid ``output`` that are not in the cell
    cache into it, on the build's adapters, merges and fuse, and write nothing else (no output, no
    lock, no manifest: the build writes the grid from the cache afterwards); returns the cells rendered.
    The cells' keys are the ones the whole build computes (same inputs, device, dtype, compile mode)."""
    from .device import pick_device, thread_policy
    from .pipeline import PipelineExecutor
    from .quiet import quiet_libraries

    quiet_libraries()
    policy = thread_policy(threads)
    options = BuildOptions(
        out_root=Path(os.devnull),  # nothing is written
        recipe_root=recipe_root,
        device=pick_device(device),
        allow_read=tuple(allow_read),
        reporter=make_reporter(quiet=True),
        provenance={},
        threads=policy,
    )
    state = BuildState(options)
    _resolve_inputs(plan, state, resolved or {})
    executor = PipelineExecutor(pipelines, cells={output: units})
    with _torch_threads(policy.threads):
        executor.build(plan, [output], state)
    return executor.rendered.get(output, 0)
