"""The execution plan: a DAG of frozen, hashable steps whose edges are typed by what flows.

Compiler output -> runner input. A step is a value: equal work is one step, and its canonical JSON
(without source positions) is its cache key; the plan's fingerprint is the sha256 of all steps'
canonical JSON, so the same recipe gives the same fingerprint on any machine. Several executors
can carry a plan out (the diffusers pipeline executor, the streaming fuser); they find what an
output needs by walking the step graph (``Plan.dependencies``). Torch-free. ``view`` renders a plan
as a tree for ``lorarecipe plan``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar

from ..recipe.vocabulary import ValueEnum

__all__ = [
    "PLAN_FORMAT",
    "Check",
    "CheckpointLayout",
    "FuseAdapters",
    "Kind",
    "LoadAdapter",
    "LoadBase",
    "LoraLayout",
    "MergeAdapters",
    "Origin",
    "OutputStep",
    "Plan",
    "PublishTarget",
    "RenderGrid",
    "SaveCheckpoint",
    "SaveLora",
    "SetAdapters",
    "Source",
    "Step",
    "canonical_json",
]

PLAN_FORMAT = 1
OPTIONAL = "lorarecipe.optional"  # field metadata: omitted from the payload while at its default


class Kind(ValueEnum):
    """What flows along an edge of the plan."""

    BASE = "base_checkpoint"
    LORA = "lora_delta"
    MIX = "adapter_mix"
    FUSED = "fused_checkpoint"
    IMAGE = "image"
    FILE = "file"


class CheckpointLayout(ValueEnum):
    """How a fused checkpoint is written: a diffusers folder, or one LDM/SGM single file."""

    DIFFUSERS = "diffusers"
    SINGLE_FILE = "single_file"


class LoraLayout(ValueEnum):
    """Key layout of a written LoRA file: diffusers/PEFT (with lora_adapter_metadata) or kohya/A1111."""

    DIFFUSERS = "diffusers"
    KOHYA = "kohya"


@dataclass(frozen=True)
class Origin:
    """Where in the recipe a step comes from (not part of the fingerprint)."""

    path: str
    file: str
    line: int
    col: int


@dataclass(frozen=True)
class Source:
    """Where an input comes from, as written in the recipe (paths stay recipe-relative)."""

    kind: str  # "hub" | "local" | "builtin"
    ref: str  # repo id, recipe-relative path, or builtin name
    revision: str | None = None
    filename: str | None = None  # weight_name inside a hub repo

    def describe(self) -> str:
        if self.kind == "hub":
            where = f"hub {self.ref}"
            if self.filename:
                where += f" / {self.filename}"
            return where + f" @ {self.revision or 'main'}"
        return f"{self.kind} {self.ref}"


def _freeze(value: Any) -> Any:
    """Lists/dicts -> tuples of (key, value) pairs, recursively, so steps stay hashable."""
    if isinstance(value, Mapping):
        return tuple((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def thaw_weight(value: Any) -> Any:
    """Inverse of the freezing used for weights: tuples of pairs -> dicts, other tuples -> lists."""
    if isinstance(value, tuple):
        if value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
            return {k: thaw_weight(v) for k, v in value}
        return [thaw_weight(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Source):
        return {k: v for k, v in vars(value).items() if v is not None}
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class Step:
    """One unit of work. ``inputs`` are the ids of the steps it consumes."""

    op: ClassVar[str] = "step"
    consumes: ClassVar[tuple[Kind, ...]] = ()
    produces: ClassVar[Kind] = Kind.FILE

    id: str
    inputs: tuple[str, ...] = ()
    origin: Origin | None = field(default=None, compare=False, hash=False)

    def payload(self) -> dict[str, Any]:
        """Canonical content of the step: every field but those left out of comparisons (the origin,
        execution choices such as a grid's ``compile``). A field added after plans were first
        fingerprinted (metadata ``OPTIONAL``) is left out while it has its default, so the steps that
        do not use it keep their keys."""
        doc: dict[str, Any] = {"op": self.op, "produces": self.produces.value}
        for f in fields(self):
            value = getattr(self, f.name)
            if not f.compare or (f.metadata.get(OPTIONAL) and value == f.default):
                continue
            doc[f.name] = _jsonable(value)
        return doc

    def to_json(self) -> dict[str, Any]:
        doc = self.payload()
        if self.origin is not None:
            doc["origin"] = {"path": self.origin.path, "line": self.origin.line, "col": self.origin.col}
        return doc

    def key(self) -> str:
        """sha256 of the canonical payload: the step's identity and cache key."""
        return hashlib.sha256(canonical_json(self.payload()).encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class LoadBase(Step):
    op: ClassVar[str] = "load_base"
    produces: ClassVar[Kind] = Kind.BASE
    source: Source
    family: str | None
    dtype: str
    variant: str | None = None
    config: Source | None = None
    single_file: bool = False


@dataclass(frozen=True, kw_only=True)
class LoadAdapter(Step):
    op: ClassVar[str] = "load_adapter"
    consumes: ClassVar[tuple[Kind, ...]] = (Kind.BASE,)
    produces: ClassVar[Kind] = Kind.LORA
    name: str
    source: Source
    format: str  # declared format ("auto" | "diffusers" | "kohya")
    trigger_words: tuple[str, ...] = ()
    #: the experts the file is loaded into (Wan 2.2 A14B: transformer and/or transformer_2); None: the
    #: family's one denoiser, as diffusers loads by default
    load_into: tuple[str, ...] | None = field(default=None, metadata={OPTIONAL: True})
    #: LoKr alpha/rank convention the recipe asks for (None: the file's own, detected). Whether an
    #: adapter is a plain LoRA or a LyCORIS/DoRA file is read from its header when it is loaded.
    scale_convention: str | None = field(default=None, metadata={OPTIONAL: True})
    #: the source is a checkpoint folder: the adapter is its weights minus the base's (extract only)
    difference: bool = field(default=False, metadata={OPTIONAL: True})


@dataclass(frozen=True, kw_only=True)
class MergeAdapters(Step):
    op: ClassVar[str] = "merge_adapters"
    consumes: ClassVar[tuple[Kind, ...]] = (Kind.LORA,)
    produces: ClassVar[Kind] = Kind.LORA
    name: str
    method: str
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    density: float | None = None
    majority_sign_method: str | None = None
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_energy: float | None = field(default=None, metadata={OPTIONAL: True})  # extract only
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    seed: int = 0
    components: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class SetAdapters(Step):
    op: ClassVar[str] = "set_adapters"
    consumes: ClassVar[tuple[Kind, ...]] = (Kind.LORA,)
    produces: ClassVar[Kind] = Kind.MIX
    adapters: tuple[str, ...]
    weights: tuple[Any, ...]  # float or frozen per-component dict, one per adapter


@dataclass(frozen=True, kw_only=True)
class FuseAdapters(Step):
    op: ClassVar[str] = "fuse_adapters"
    consumes: ClassVar[tuple[Kind, ...]] = (Kind.BASE, Kind.LORA, Kind.MIX)
    produces: ClassVar[Kind] = Kind.FUSED
    adapters: tuple[str, ...]
    weights: tuple[Any, ...]  # the set_adapters weight of each fused adapter (1.0 when not in the mix)
    lora_scale: float
    components: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class OutputStep(Step):
    """A step that writes one recipe output (``outputs.<output>``) at ``path`` under the output root."""

    output: str
    path: str


@dataclass(frozen=True, kw_only=True)
class SaveCheckpoint(OutputStep):
    op: ClassVar[str] = "save_checkpoint"
    consumes: ClassVar[tuple[Kind, ...]] = (Kind.FUSED,)
    produces: ClassVar[Kind] = Kind.FILE
    layout: CheckpointLayout
    dtype: str | None = None
    card: bool = True
    #: a single file of a family with two experts holds one of them (None: the family's denoiser)
    component: str | None = field(default=None, metadata={OPTIONAL: True})


@dataclass(frozen=True, kw_only=True)
class SaveLora(OutputStep):
    op: ClassVar[str] = "save_lora"
    consumes: ClassVar[tuple[Kind, ...]] = (Kind.LORA,)
    produces: ClassVar[Kind] = Kind.FILE
    adapter: str
    layout: LoraLayout
    weight_name: str
    dtype: str | None = None
    card: bool = True
    #: the expert whose layers the file holds (families with two experts; None: every component)
    component: str | None = field(default=None, metadata={OPTIONAL: True})


@dataclass(frozen=True, kw_only=True)
class RenderGrid(OutputStep):
    op: ClassVar[str] = "render_grid"
    consumes: ClassVar[tuple[Kind, ...]] = (Kind.BASE, Kind.LORA, Kind.MIX, Kind.FUSED)
    produces: ClassVar[Kind] = Kind.IMAGE
    prompts: tuple[str, ...]
    negative_prompt: str
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    width: int | None
    height: int | None
    variants: tuple[str, ...]
    sweep_adapter: str | None = None
    sweep_weights: tuple[float, ...] | None = None
    sweep_lora_scale: tuple[float, ...] | None = None
    trigger_words: tuple[tuple[str, tuple[str, ...]], ...] = ()  # adapter -> words, for prompts
    threads: int = 1  # torch intra-op threads while rendering: images depend on it on CPU
    true_cfg_scale: float | None = field(default=None, metadata={OPTIONAL: True})  # FLUX.1 true CFG
    frames: int | None = field(default=None, metadata={OPTIONAL: True})  # video families: frames per cell
    #: how to render (``none``/``regional``; None: as the build is told). An execution choice like
    #: the device, so not part of the step's key or the plan's fingerprint (``compare=False``).
    compile: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PublishTarget:
    """Where an output is published on the Hub (rendered and validated; not part of the fingerprint,
    so changing it never rebuilds anything)."""

    output: str
    repo: str
    revision: str = "main"
    private: bool = True
    create: bool = True
    commit_message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            k: getattr(self, k) for k in ("output", "repo", "revision", "private", "create", "commit_message")
        }


@dataclass(frozen=True)
class Check:
    """A static check's outcome for one input (shown by ``plan``; not part of the fingerprint)."""

    subject: str  # "base" or "adapters.<name>"
    status: str  # "ok" | "unchecked" | "warning"
    detail: str
    facts: tuple[tuple[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "status": self.status,
            "detail": self.detail,
            "facts": {k: _jsonable(v) for k, v in self.facts},
        }


@dataclass(frozen=True)
class Plan:
    """A compiled build: ordered steps (a topological order of the DAG) plus static-check results."""

    recipe: str  # recipe file as displayed (relative path)
    name: str
    build: str  # matrix label, '' without a matrix
    family: str | None
    steps: tuple[Step, ...]
    variables: tuple[tuple[str, Any], ...] = ()
    checks: tuple[Check, ...] = ()
    estimates: tuple[tuple[str, Any], ...] = ()
    meta: tuple[tuple[str, Any], ...] = ()  # description, license: they shape model cards, so fingerprinted
    publish: tuple[PublishTarget, ...] = ()  # not fingerprinted: where outputs go on the Hub

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def of_type(self, cls: type[Step]) -> list[Any]:
        return [s for s in self.steps if isinstance(s, cls)]

    def output_steps(self) -> list[OutputStep]:
        """The steps that write the recipe's outputs, in plan order."""
        return [s for s in self.steps if isinstance(s, OutputStep)]

    def output_step(self, output: str) -> OutputStep:
        for step in self.output_steps():
            if step.output == output:
                return step
        raise KeyError(output)

    def dependencies(self, *step_ids: str) -> list[Step]:
        """The steps ``step_ids`` and every step they depend on (transitively, along ``inputs``), in
        plan order."""
        by_id = {s.id: s for s in self.steps}
        seen: set[str] = set()
        stack = list(step_ids)
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(by_id[current].inputs)
        return [s for s in self.steps if s.id in seen]

    def part_key(self, step_id: str) -> str:
        """sha256 of ``step_id``'s part of the plan: its payload and every step it depends on (what an
        output's content depends on in the plan; the input files' bytes aside)."""
        part = sorted(self.dependencies(step_id), key=lambda s: s.id)
        return hashlib.sha256(canonical_json([s.payload() for s in part]).encode()).hexdigest()

    def fingerprint(self) -> str:
        """sha256 of the canonical plan: what will be loaded, computed and written."""
        doc = {
            "plan_format": PLAN_FORMAT,
            "name": self.name,
            "build": self.build,
            "variables": [[k, v] for k, v in self.variables],
            "meta": [[k, v] for k, v in self.meta],
            "steps": [s.payload() for s in self.steps],
        }
        return "sha256:" + hashlib.sha256(canonical_json(doc).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "plan_format": PLAN_FORMAT,
            "recipe": self.recipe,
            "name": self.name,
            "build": self.build,
            "fingerprint": self.fingerprint(),
            "family": self.family,
            "variables": {k: v for k, v in self.variables},
            "meta": {k: v for k, v in self.meta},
            "steps": [s.to_json() for s in self.steps],
            "checks": [c.to_json() for c in self.checks],
            "estimates": {k: v for k, v in self.estimates},
            "publish": [p.to_json() for p in self.publish],
        }


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, shortest float repr (identical on every machine)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
