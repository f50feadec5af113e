"""What a build has done so far, in one typed shape that every executor fills in.

Plan + options -> ``BuildState``: the inputs, resolved once before any executor runs, and for each
output the ``OutputRecord`` its executor wrote (files, the fuse check of a checkpoint, the grid's
fused-vs-runtime difference). Model cards and the manifest (``records``) read only this, so the
manifest has one shape whichever executor built an output.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..plan import OutputStep, Step
from .device import ThreadPolicy
from .inputs import ResolvedInput
from .progress import Reporter
from .step_context import step_context

__all__ = ["BuildOptions", "BuildState", "FuseCheck", "OutputRecord"]


@dataclass(frozen=True)
class BuildOptions:
    """Where and how to build: the same for every executor of one build."""

    out_root: Path
    recipe_root: Path
    device: str
    allow_read: tuple[Path, ...]
    reporter: Reporter
    provenance: dict[str, str]  # metadata stamped into every safetensors file and PNG
    threads: ThreadPolicy | None = None  # torch intra-op threads (recorded in the manifest)

    def stamp(self, output: str) -> dict[str, str]:
        """The provenance metadata of one output's files."""
        return {**self.provenance, "lorarecipe.output": output}


@dataclass(frozen=True)
class FuseCheck:
    """How a fused checkpoint was checked: ``expected`` base weights a fused adapter applies to, of
    which ``changed`` changed (the pipeline route requires all of them and no other; the streaming
    route fuses each target exactly once, and a delta can round away below float32), NaN/Inf refused.
    The streaming route also reports the tensors it wrote, the largest rounding difference from the
    exact float32 fuse, its peak RSS, and whether the LoRA factors came from its cache."""

    changed: int
    expected: int
    components: tuple[str, ...] = ()
    tensors: int | None = None
    max_abs_diff_vs_fp32: float | None = None
    peak_rss_bytes: int | None = None
    lora_factors_from_cache: bool | None = None

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["components"] = list(self.components)
        return doc


@dataclass
class OutputRecord:
    """One built output: which executor built it and the files it wrote (absolute paths)."""

    executor: str
    files: list[Path]
    fuse: FuseCheck | None = None
    fused_vs_runtime_max_diff: float | None = None  # grids that show ``fused``
    compiled: str | None = None  # grids rendered through a compiled denoiser: the compile mode
    #: sha256 and size of files the executor hashed while writing them (not read again)
    hashes: dict[Path, tuple[str, int]] = field(default_factory=dict)


@dataclass
class BuildState:
    """Resolved inputs, built outputs, the base's dtype as loaded, per-step timings."""

    options: BuildOptions
    inputs: dict[str, ResolvedInput] = field(default_factory=dict)  # step id -> input
    config: Path | None = None  # config folder of a single-file base
    outputs: dict[str, OutputRecord] = field(default_factory=dict)
    adapters: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> component -> modules
    #: ``extract`` merges: name -> rank and relative Frobenius error of every module (the manifest's)
    extractions: dict[str, dict[str, Any]] = field(default_factory=dict)
    dtype: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: writes an output folder's model card into a folder (the temporary one, before it is swapped in)
    card_writer: Callable[[OutputStep, Path], None] | None = None
    #: told each finished output (the manifest journal records it, so a killed build leaves it listed)
    on_output: Callable[[str, OutputRecord], None] | None = None

    def add_output(self, name: str, record: OutputRecord) -> None:
        """Record a finished output (complete at its final path, card included)."""
        self.outputs[name] = record
        if self.on_output is not None:
            self.on_output(name, record)

    def before_swap(self, step: OutputStep) -> Callable[[Path], None] | None:
        """What to write into ``step``'s temporary folder before it replaces the final one: its card."""
        writer = self.card_writer
        if writer is None:
            return None
        return lambda folder: writer(step, folder)

    def adapter_paths(self) -> dict[str, Path]:
        """Adapter name -> its resolved LoRA file."""
        return {k.split(":", 1)[1]: v.path for k, v in self.inputs.items() if k.startswith("adapter:")}

    def files(self) -> dict[str, list[Path]]:
        """Output name -> the files written for it."""
        return {name: record.files for name, record in self.outputs.items()}

    @contextlib.contextmanager
    def step(self, step: Step, label: str) -> Iterator[None]:
        """Run one plan step: progress line, ``step_context`` (failures located at its recipe line),
        and its wall time added to ``timings``."""
        self.options.reporter.step(label)
        start = time.perf_counter()
        with step_context(step):
            yield
        self.timings[step.id] = self.timings.get(step.id, 0.0) + time.perf_counter() - start
