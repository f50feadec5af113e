"""Stream one fused checkpoint: fuse + save without building the pipeline, in memory bounded by the
largest tensor, with the pipeline route's result.

Plan (LoadBase, LoadAdapter, MergeAdapters, FuseAdapters) + one SaveCheckpoint -> a diffusers folder
or an LDM/SGM single file at ``final``, written atomically. What to add where is decided by diffusers
and PEFT themselves, on a weightless skeleton of the pipeline (``skeleton``): diffusers'
LoRA conversion and loading, PEFT merges, ``set_adapters`` with per-block weights, ``lora_scale``.
What they decide is kept as LoRA factors per module (``factors``) and cached per adapter
(``factor_cache``): a later fuse of the same LoRA files, with any scalar weights, ``lora_scale`` or
components, imports torch but neither diffusers, transformers nor PEFT.
The base is never loaded: each tensor is read with a positional read (no mmap), fused in float32
and rounded once to the output dtype, and written at an offset fixed by a header computed up front;
untouched tensors are copied by the kernel, starting before diffusers is even imported. In float32
the result is bit-identical to the pipeline route (``tests/test_streaming.py``); in float16/bfloat16
it is within half an ulp of the exact value, while the pipeline route rounds each adapter's delta and
each partial sum (the two differ by at most 2 ulps of the largest operand when the LoRA files have the
base's dtype). Must not import torch, diffusers or peft at module import (a test checks).
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import BuildError, StreamingUnsupported
from ...fs.atomic import atomic_dir, atomic_file
from ...plan import CheckpointLayout, FuseAdapters, LoadBase, Plan, SaveCheckpoint
from ...recipe.vocabulary import FAMILIES
from ..fuse_math import FuseTarget, LoraFactor
from ..pipeline.load import load_dtype
from .factor_cache import FactorCache
from .factors import block_specs, fuse_block_weights, resolvable_weights, targets_from_factors
from .lycoris_targets import split_fuse
from .positional_io import PositionalReader
from .skeleton import Architecture, build_skeleton, fuse_targets, needed_adapters, prepare_adapters
from .sources import (
    FLOAT_DTYPES,
    DTypeRule,
    FolderBase,
    OutFile,
    Part,
    config_components,
    folder_parts,
    folder_to_folder,
    read_folder_base,
    resolve_key,
    shard_index,
    single_file_parts,
    to_folder,
    to_single_file,
)
from .writer import StreamWriter, WriteStats

__all__ = ["StreamReport", "peak_rss_bytes", "stream_fuse"]


@dataclass
class StreamReport:
    """What the stream did: tensors written, tensors a fused adapter changed, this process's peak RSS
    (bytes, None where unknown), wall time, and for float16/bfloat16 outputs the largest rounding
    difference of a fused tensor from its exact float32 value (0.0 for float32 outputs)."""

    tensors: int
    changed: int
    targets: int  # base weights a fused adapter applies to (each was fused)
    components: tuple[str, ...]  # the components those weights belong to
    peak_rss_bytes: int | None
    seconds: float
    max_abs_diff_vs_fp32: float | None = None
    factors_cached: bool = False  # the LoRA factors came from the cache: diffusers/PEFT not imported
    #: sha256 and size of each safetensors file written, by path relative to the output ("" for a
    #: single file), computed while writing
    file_hashes: dict[str, tuple[str, int]] = field(default_factory=dict)


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far, in bytes, or None where unknown.

    Linux: ``VmHWM`` (``ru_maxrss`` also counts the parent's memory when the process was forked from
    a large one before exec); elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def _rekey(targets: dict[tuple[str, str], FuseTarget], base: FolderBase) -> dict[tuple[str, str], FuseTarget]:
    """Targets keyed by the model's state-dict keys -> by the keys the base files store them under."""
    out: dict[tuple[str, str], FuseTarget] = {}
    for (component, key), target in targets.items():
        found = resolve_key(base.keys(component), key)
        if found is None:
            raise BuildError(
                f"{component}: the base stores no weight {key!r} for LoRA module {target.module_name}"
            )
        out[(component, found)] = target
    return out


def _folder_shapes(folder: FolderBase) -> dict[str, dict[str, tuple[int, ...]]]:
    """Each component's weight keys and shapes as a diffusers folder stores them."""
    return {c: {k: h.tensors[k].shape for k, (_, h) in folder.keys(c).items()} for c in folder.files}


def _check_all_used(targets: Mapping[tuple[str, str], FuseTarget], stats: WriteStats) -> None:
    unused = sorted(f"{c}.{k}" for c, k in targets if (c, k) not in stats.used)
    if unused:
        raise BuildError(
            f"{len(unused)} fused LoRA modules map to no tensor of the output (they would be dropped): "
            + ", ".join(unused[:5])
        )


def _plan_outputs(
    save: SaveCheckpoint,
    family: str,
    base_path: Path,
    folder: FolderBase | None,
    arch: Architecture,
    out_dtype: DTypeRule,
    config: FolderBase | None = None,
) -> list[OutFile]:
    """The output files of every layout but folder -> folder (which needs no shapes or configs). A
    folder from a single file takes the components the file lacks (FLUX's text encoders and VAE, Wan's
    other expert) from ``config``, as the pipeline route loads them."""
    parts: dict[tuple[str, str], Part]
    if folder is not None:
        parts = folder_parts(folder, arch.shapes)
    else:
        parts = single_file_parts(base_path, family, arch.shapes, arch.configs)
        if save.layout is CheckpointLayout.DIFFUSERS:
            outs = to_folder(arch.shapes, arch.libraries, parts, out_dtype)
            return outs + (folder_to_folder(config, out_dtype) if config is not None else [])
    return [to_single_file(family, arch.shapes, arch.configs, parts, out_dtype, save.component)]


def _from_config_rekeyed(
    targets: dict[tuple[str, str], FuseTarget], config: FolderBase
) -> dict[tuple[str, str], FuseTarget]:
    """A folder from a single file: the targets in components the config folder gives (Wan 2.2's other
    expert, FLUX's text encoders), keyed by the keys its files store them under."""
    moved = {key: target for key, target in targets.items() if key[0] in config.files}
    kept = {key: target for key, target in targets.items() if key not in moved}
    return {**kept, **_rekey(moved, config)}


def _config_stating(source: Path, dtype: str) -> str | None:
    """A copied ``config.json`` rewritten to state ``dtype``, or None when it records no dtype.

    transformers 5 loads a model in the ``dtype`` (formerly ``torch_dtype``) its config records when
    ``from_pretrained`` gets no dtype: a float16 base's config beside float32 weights would load them
    as float16, silently. diffusers model configs record no dtype (they load as float32 by default).
    """
    try:
        doc = json.loads(source.read_text(encoding="utf-8"))
    except ValueError:
        return None

    def restate(node: Any) -> bool:
        found = False
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("dtype", "torch_dtype") and isinstance(value, str):
                    node[key], found = dtype, True
                else:
                    found = restate(value) or found
        return found

    return json.dumps(doc, indent=2, sort_keys=True) + "\n" if restate(doc) else None


def _copy_files(root: Path, folder: FolderBase, outs: list[OutFile], dtype: str) -> None:
    """Non-weight files (model_index.json, configs, tokenizers, scheduler) of the base or config folder,
    and the shard indexes of the weights written from it; model configs state the dtype the weights
    beside them were written in."""
    copies = folder.copies
    for component in folder.files:
        written = shard_index(folder, component, outs)
        if written is not None:
            (root / written[0]).parent.mkdir(parents=True, exist_ok=True)
            (root / written[0]).write_text(written[1], encoding="utf-8")
    for source, rel in copies:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        restated = _config_stating(source, dtype) if target.name == "config.json" else None
        if restated is None:
            shutil.copyfile(source, target)
        else:
            target.write_text(restated, encoding="utf-8")


class _Stream:
    """One streamed checkpoint: the base, what to add where, and the files being written.

    ``write(root)`` runs the two halves in an order that overlaps them: for a folder -> folder fuse
    the output headers are known from the base's headers alone, so the verbatim copy starts at once;
    then the fuse targets come from the factor cache, or from diffusers and PEFT on the skeleton (the
    architecture a single-file layout needs comes the same way); then every tensor a target touches
    is computed and written.
    """

    def __init__(
        self,
        plan: Plan,
        save: SaveCheckpoint,
        base_path: Path,
        config_path: Path | None,
        adapter_paths: Mapping[str, Path],
        metadata: Mapping[str, str],
    ) -> None:
        base = plan.step("base")
        fuses = plan.of_type(FuseAdapters)
        if not isinstance(base, LoadBase) or not fuses:
            raise BuildError("internal: the plan has no base or no fuse step to stream")
        self.plan, self.save = plan, save
        # diffusers/PEFT decide the LoRA part on the skeleton; LyCORIS/DoRA adapters are lorarecipe's own
        self.fuse, self.lycoris = split_fuse(plan, fuses[0], adapter_paths)
        for merge in needed_adapters(plan, self.fuse)[1]:
            if merge.svd_driver is not None:
                raise StreamingUnsupported(
                    f"merge {merge.name!r} sets svd_driver, a CUDA-only torch.linalg.svd option; "
                    "the streaming fuser merges on the CPU"
                )
        self.base_path, self.config_path, self.adapter_paths = base_path, config_path, adapter_paths
        self.family = plan.family or "sd1"
        self.folder: FolderBase | None = None
        self.config: FolderBase | None = None  # a single-file base's other components, for a folder
        self.pipeline_class: str | None = None  # None: the one model_index.json names
        if base.single_file:
            if config_path is None:
                raise StreamingUnsupported(
                    "a single-file base needs its diffusers config folder ('config') to stream"
                )
            self.config_root, self.pipeline_class = config_path, FAMILIES[self.family].pipeline_class
        else:
            self.folder = read_folder_base(base_path, base.variant)
            self.config_root, self.pipeline_class = base_path, None
        stored = load_dtype(base, base_path)
        self.stored = stored
        self.dtype = save.dtype or stored
        # the pipeline route fuses in float32 (a float32 base, or a float32 load for an output in another
        # dtype): reproduce PEFT's operations; it fuses a half-precision base in its own dtype only for
        # an output in that dtype, which cannot match bit for bit anyway (see fuse_math.fused_weight)
        self.peft_order = stored == "float32" or self.dtype != stored
        # folder -> folder needs no architecture: every output tensor is a base tensor, same key
        self.folder_to_folder = self.folder is not None and save.layout is CheckpointLayout.DIFFUSERS
        self.metadata = {"format": "pt", **metadata}
        self.reader = PositionalReader()
        self.stats = WriteStats()
        self.outs: list[OutFile] = []
        self.from_cache = False
        self.hashes: dict[str, tuple[str, int]] = {}  # sha256 and size per output file (relative path)
        self._storing: list[threading.Thread] = []

    def out_dtype(self, stored: str, component: str = "", key: str = "") -> str:
        """The dtype an output tensor is written in: the output's (the base's by default) — but float32
        for the modules the denoiser's class keeps in float32 when diffusers loads it in the half
        dtype the output has (Wan's time embedder, norms, modulation), as the pipeline route saves them."""
        if stored not in FLOAT_DTYPES.values():
            return stored
        info = FAMILIES.get(self.family)
        kept = (
            info is not None
            and self.dtype == self.stored != "float32"
            and component in info.denoisers
            and any(name in key.split(".") for name in info.keep_in_float32)
        )
        return FLOAT_DTYPES["float32" if kept else self.dtype]

    def write(self, root: Path) -> None:
        """Write the output files under ``root`` (a temporary folder, or the temporary file)."""
        writer: StreamWriter | None = None
        try:
            if self.folder_to_folder:
                assert self.folder is not None
                writer = self._start_writer(root, folder_to_folder(self.folder, self.out_dtype))
            targets, arch = self._targets()
            if writer is None:
                assert arch is not None
                if self.folder is None and self.save.layout is CheckpointLayout.DIFFUSERS:
                    held = set(FAMILIES[self.family].single_file_components)
                    self.config = config_components(read_folder_base(self.config_root, None), held)
                outs = _plan_outputs(
                    self.save, self.family, self.base_path, self.folder, arch, self.out_dtype, self.config
                )
                writer = self._start_writer(root, outs)
            if self.folder_to_folder:
                assert self.folder is not None
                targets = _rekey(targets, self.folder)
                shapes = _folder_shapes(self.folder)
            else:
                assert arch is not None
                shapes = arch.shapes
            targets = self.lycoris.join(targets, shapes, self.adapter_paths, self.family)
            if self.config is not None:
                targets = _from_config_rekeyed(targets, self.config)
            targets = self._held(targets)
            writer.finish(targets, self.stats)
            _check_all_used(targets, self.stats)
            self.hashes = {
                (path.relative_to(root).as_posix() if path != root else ""): digest
                for path, digest in writer.hashes.items()
            }
        except BaseException:
            if writer is not None:
                writer.abort()
            raise

    def _held(self, targets: dict[tuple[str, str], FuseTarget]) -> dict[tuple[str, str], FuseTarget]:
        """A single file of one expert (Wan 2.2 A14B) leaves the other expert's targets to its own output."""
        info = FAMILIES[self.family]
        if self.save.layout is not CheckpointLayout.SINGLE_FILE or not info.experts:
            return targets
        other = set(info.experts) - {self.save.component or info.denoiser}
        return {key: target for key, target in targets.items() if key[0] not in other}

    def _start_writer(self, root: Path, outs: list[OutFile]) -> StreamWriter:
        self.outs = outs
        writer = StreamWriter(root, outs, self.reader, self.metadata, peft_order=self.peft_order)
        writer.start_copier()
        return writer

    def _targets(self) -> tuple[dict[tuple[str, str], FuseTarget], Architecture | None]:
        """The fuse targets (from cached factors, or decided by diffusers/PEFT on the skeleton, whose
        factors are then cached in the background), and the architecture unless folder -> folder."""
        # the components a single-file layout needs besides the LoRA-loadable ones (shapes and configs)
        extra = () if self.folder_to_folder else FAMILIES[self.family].single_file_components
        cache = FactorCache(self.plan, self.fuse, self.adapter_paths, self.config_root, self.pipeline_class)
        factors = cache.load(self.fuse.adapters) if resolvable_weights(self.fuse) else None
        arch = None if self.folder_to_folder else cache.load_architecture(extra)
        needs_arch = arch is None and not self.folder_to_folder
        if not self.fuse.adapters:  # only LyCORIS/DoRA adapters: no LoRA for diffusers/PEFT to decide
            if needs_arch:
                from ..quiet import quiet_libraries

                quiet_libraries(load=True)
                arch = build_skeleton(self.config_root, self.pipeline_class, extra).arch
                cache.store_architecture(extra, arch)
            return {}, arch
        if factors is not None and not needs_arch:
            self.from_cache = True
            return self._from_factors(factors), arch
        from ..quiet import quiet_libraries

        quiet_libraries(load=True)
        skeleton = build_skeleton(self.config_root, self.pipeline_class, extra)
        if needs_arch:
            arch = skeleton.arch
            cache.store_architecture(extra, arch)
        if factors is not None:
            self.from_cache = True
            return self._from_factors(factors), arch
        prepare_adapters(skeleton, self.plan, self.fuse, self.adapter_paths)
        targets, found = fuse_targets(skeleton, self.fuse, self.family)
        # written (with fsync) while the tensors stream; best effort, joined by close()
        self._storing.append(threading.Thread(target=cache.store, args=(found,), daemon=True))
        self._storing[-1].start()
        return targets, arch

    def _from_factors(
        self, factors: Mapping[str, Mapping[tuple[str, str], LoraFactor]]
    ) -> dict[tuple[str, str], FuseTarget]:
        """Targets from cached factors; per-block weights checked against the denoiser's config.json."""
        blocks = {}
        specs = block_specs(self.fuse)
        if specs:
            configs = {
                component: json.loads(
                    (self.config_root / component / "config.json").read_text(encoding="utf-8")
                )
                for component in {c for _, c in specs}
            }
            blocks = fuse_block_weights(self.fuse, self.family, configs)
        return targets_from_factors(factors, self.fuse, None, self.family, blocks)

    def close(self) -> None:
        for thread in self._storing:
            thread.join()
        self.reader.close()


def stream_fuse(
    plan: Plan,
    save: SaveCheckpoint,
    *,
    base_path: Path,
    config_path: Path | None,
    adapter_paths: Mapping[str, Path],
    final: Path,
    metadata: Mapping[str, str],
    before_swap: Callable[[Path], None] | None = None,
) -> StreamReport:
    """Fuse the plan's FuseAdapters step into the base and write ``save``'s output at ``final``.

    ``base_path`` is the base diffusers folder, or the single file when LoadBase.single_file (then
    ``config_path`` is its diffusers config folder); ``adapter_paths`` maps adapter names to LoRA
    files; ``metadata`` goes into every safetensors file written; ``before_swap(folder)`` completes a
    folder output (its model card) before it replaces the final one. Raises ``StreamingUnsupported`` for
    what the stream cannot reproduce exactly (LoRA bias, an ``extract`` merge, unreadable single-file
    layouts; LyCORIS/DoRA files are fused, with ``lycoris_targets``), and
    ``BuildError`` for what no route could build (NaN/Inf, a LoRA that fits no base weight).
    """
    started = time.perf_counter()
    stream = _Stream(plan, save, base_path, config_path, adapter_paths, metadata)
    try:
        if save.layout is CheckpointLayout.DIFFUSERS:
            with atomic_dir(final) as tmp:
                stream.write(tmp)
                source = stream.folder or stream.config
                assert source is not None
                _copy_files(tmp, source, stream.outs, stream.dtype)
                if before_swap is not None:
                    before_swap(tmp)
        else:
            with atomic_file(final) as tmp:
                stream.write(tmp)
    finally:
        stream.close()
    stats = stream.stats
    return StreamReport(
        tensors=stats.tensors,
        changed=stats.changed,
        targets=len(stats.used),
        components=tuple(sorted({component for component, _ in stats.used})),
        peak_rss_bytes=peak_rss_bytes(),
        seconds=time.perf_counter() - started,
        max_abs_diff_vs_fp32=stats.max_abs_diff_vs_fp32,
        factors_cached=stream.from_cache,
        file_hashes=stream.hashes,
    )
