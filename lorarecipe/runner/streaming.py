"""The streaming fuse executor: fuse + save without building the pipeline, in memory bounded by the
largest tensor, with the pipeline route's result.

Plan (LoadBase, LoadAdapter, MergeAdapters, FuseAdapters) + one SaveCheckpoint -> a diffusers folder
or an LDM/SGM single file at ``final``, written atomically. What to add where is decided by diffusers
and PEFT themselves, on a weightless skeleton of the pipeline (``streaming_skeleton``): diffusers'
LoRA conversion and loading, PEFT merges, ``set_adapters`` with per-block weights, ``lora_scale``.
What they decide is kept as LoRA factors per module (``streaming_factors``) and cached per adapter
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

import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_dir, atomic_file
from ..errors import BuildError
from ..plan import FuseAdapters, LoadBase, Plan, SaveCheckpoint
from ..vocabulary import FAMILIES
from .factor_cache import FactorCache
from .streaming_factors import FuseTarget, scalar_weights, targets_from_factors
from .streaming_io import PositionalReader
from .streaming_layout import (
    FLOAT_DTYPES,
    FolderBase,
    OutFile,
    Part,
    folder_parts,
    folder_to_folder,
    read_folder_base,
    resolve_key,
    shard_index,
    single_file_parts,
    to_folder,
    to_single_file,
)
from .streaming_skeleton import Layout, build_skeleton, fuse_targets, prepare_adapters
from .streaming_write import StreamWriter, WriteStats

__all__ = ["StreamReport", "peak_rss_bytes", "pipeline_dtype", "stream_fuse"]


@dataclass
class StreamReport:
    """What the stream did: tensors written, tensors a fused adapter changed, this process's peak RSS
    (bytes, None where unknown), wall time, and for float16/bfloat16 outputs the largest rounding
    difference of a fused tensor from its exact float32 value (0.0 for float32 outputs)."""

    tensors: int
    changed: int
    peak_rss_bytes: int | None
    seconds: float
    max_abs_diff_vs_fp32: float | None = None
    factors_cached: bool = False  # the LoRA factors came from the cache: diffusers/PEFT not imported


def pipeline_dtype(base: LoadBase, base_path: Path) -> str:
    """The dtype the pipeline route loads the base in (``load_pipeline``'s rule): the recipe's, else
    the stored dtype of the denoiser (majority of its tensors), else float32."""
    from .pipeline_load import check_model_index, stored_dtype, stored_dtype_of_file

    if base.dtype != "auto":
        return base.dtype
    if base.single_file:
        return stored_dtype_of_file(base_path) or "float32"
    index = check_model_index(base_path)
    denoiser = "unet" if "unet" in index else "transformer"
    return stored_dtype(base_path, denoiser, base.variant) or "float32"


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
    layout: Layout,
    out_dtype: Callable[[str], str],
) -> list[OutFile]:
    """The output files of every layout but folder -> folder (which needs no shapes or configs)."""
    parts: dict[tuple[str, str], Part]
    if folder is not None:
        parts = folder_parts(folder, layout.shapes)
    else:
        parts = single_file_parts(base_path, family, layout.shapes, layout.configs)
        if save.layout == "diffusers":
            return to_folder(layout.shapes, layout.libraries, parts, out_dtype)
    return [to_single_file(family, layout.shapes, layout.configs, parts, out_dtype)]


def _copy_files(root: Path, folder: FolderBase | None, config_path: Path | None, outs: list[OutFile]) -> None:
    """Non-weight files (model_index.json, configs, tokenizers, scheduler) of the base or config folder."""
    if folder is not None:
        copies = folder.copies
        for component in folder.files:
            written = shard_index(folder, component, outs)
            if written is not None:
                (root / written[0]).parent.mkdir(parents=True, exist_ok=True)
                (root / written[0]).write_text(written[1], encoding="utf-8")
    else:
        assert config_path is not None
        copies = read_folder_base(config_path, None).copies
    for source, rel in copies:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def stream_fuse(
    plan: Plan,
    save: SaveCheckpoint,
    *,
    base_path: Path,
    config_path: Path | None,
    adapter_paths: Mapping[str, Path],
    final: Path,
    metadata: Mapping[str, str],
) -> StreamReport:
    """Fuse the plan's FuseAdapters step into the base and write ``save``'s output at ``final``.

    ``base_path`` is the base diffusers folder, or the single file when LoadBase.single_file (then
    ``config_path`` is its diffusers config folder); ``adapter_paths`` maps adapter names to LoRA
    files; ``metadata`` goes into every safetensors file written. Raises ``BuildError`` for what the
    stream cannot reproduce exactly (LoRA bias, DoRA, unreadable single-file layouts).
    """
    from .quiet import quiet_libraries

    started = time.perf_counter()
    base = plan.step("base")
    if not isinstance(base, LoadBase):
        raise BuildError("the plan has no base step")
    fuses = plan.of_type(FuseAdapters)
    if not fuses:
        raise BuildError("the plan has no fuse step: nothing to stream")
    fuse: FuseAdapters = fuses[0]
    family = plan.family or "sd1"
    folder: FolderBase | None = None
    if base.single_file:
        if config_path is None:
            raise BuildError("a single-file base needs its diffusers config folder ('config') to stream")
        config_root, pipeline_class = config_path, FAMILIES[family].pipeline_class
    else:
        folder = read_folder_base(base_path, base.variant)
        config_root, pipeline_class = base_path, None
    dtype = save.dtype or pipeline_dtype(base, base_path)

    def out_dtype(stored: str) -> str:
        return FLOAT_DTYPES[dtype] if stored in FLOAT_DTYPES.values() else stored

    def run(root: Path) -> tuple[list[OutFile], bool]:
        """Write the output files under ``root``; also whether the factors came from the cache."""
        writer: StreamWriter | None = None
        outs: list[OutFile] = []
        try:
            folder_out = folder is not None and save.layout == "diffusers"
            if folder_out:  # known from headers: copy at once
                assert folder is not None
                outs = folder_to_folder(folder, out_dtype)
                writer = StreamWriter(root, outs, reader, stamped)
                writer.start_copier()
            extra = () if folder_out else ("vae", "text_encoder", "text_encoder_2")
            cache = FactorCache(plan, fuse, adapter_paths, config_root, pipeline_class)
            factors = cache.load(fuse.adapters) if scalar_weights(fuse) else None
            from_cache = factors is not None
            layout = None if folder_out else cache.load_layout(extra)
            skeleton = None
            if factors is None or (layout is None and not folder_out):
                quiet_libraries(load=True)
                skeleton = build_skeleton(config_root, pipeline_class, extra)
                layout = skeleton.layout
                if not folder_out:
                    cache.store_layout(extra, layout)
            if writer is None:
                assert layout is not None
                outs = _plan_outputs(save, family, base_path, folder, layout, out_dtype)
                writer = StreamWriter(root, outs, reader, stamped)
                writer.start_copier()
            if factors is None:
                assert skeleton is not None
                prepare_adapters(skeleton, plan, fuse, adapter_paths)
                targets, factors = fuse_targets(skeleton, fuse)
                # written (with fsync) while the tensors stream; best effort, joined before returning
                storing.append(threading.Thread(target=cache.store, args=(factors,), daemon=True))
                storing[-1].start()
            else:
                targets = targets_from_factors(factors, fuse)
            if folder_out:
                assert folder is not None
                targets = _rekey(targets, folder)
            writer.finish(targets, stats)
            _check_all_used(targets, stats)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        return outs, from_cache

    stats = WriteStats()
    storing: list[threading.Thread] = []
    reader = PositionalReader()
    stamped = {"format": "pt", **metadata}
    try:
        if save.layout == "diffusers":
            with atomic_dir(final) as tmp:
                outs, cached = run(tmp)
                _copy_files(tmp, folder, config_path, outs)
        else:
            with atomic_file(final) as tmp:
                _outs, cached = run(tmp)
    finally:
        for thread in storing:
            thread.join()
        reader.close()
    return StreamReport(
        tensors=stats.tensors,
        changed=stats.changed,
        peak_rss_bytes=peak_rss_bytes(),
        seconds=time.perf_counter() - started,
        max_abs_diff_vs_fp32=stats.max_abs_diff_vs_fp32,
        factors_cached=cached,
    )
