"""Write the output files: verbatim byte runs by the kernel in a background thread, the rest computed.

OutFiles + fuse targets -> safetensors files whose headers were fixed up front. A tensor whose dtype
and byte layout do not change is copied as raw bytes, coalesced with its neighbours into one
``copy_file_range``, by a thread that starts before the targets are known (while diffusers is still
being imported). The tensors the fuse targets are then claimed (rewritten if already copied) and,
with every tensor whose dtype or layout changes, computed in the calling thread by
:mod:`.tensors`. Writes are positional, so the two threads never wait for each other except
on a tensor being copied that turns out to be fused.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import BuildError
from ..fuse_math import FuseTarget
from .hasher import OutputHasher
from .positional_io import PositionalReader, SafetensorsWriter, WriteBehind
from .sources import SAME_BYTES_FORMS, OutFile, OutTensor
from .tensors import Scratch, WriteStats, as_bytes, compute, write_chunked

__all__ = ["StreamWriter", "WriteStats"]

_RUN_BYTES = 256 * 1024 * 1024


def _verbatim_source(tensor: OutTensor) -> tuple[Path, int, int] | None:
    """(file, offset, length) when the output tensor is stored bytes verbatim (unless fused), else None."""
    parts = tensor.parts
    if any(p.tensor.dtype != tensor.dtype for p in parts):
        return None
    verbatim = all(p.stored in SAME_BYTES_FORMS for p in parts) and tensor.transform in SAME_BYTES_FORMS
    same_transpose = len(parts) == 1 and parts[0].rows is None and parts[0].stored == tensor.transform
    if not (verbatim or same_transpose):
        return None
    path = parts[0].path
    start, length = parts[0].byte_range
    end = start + length
    for part in parts[1:]:
        offset, size = part.byte_range
        if part.path != path or offset != end:
            return None
        end = offset + size
    return (path, start, end - start) if end - start == tensor.entry.nbytes else None


class _HeapTrimmer:
    """glibc only: hand freed heap memory back to the system every ``every`` bytes of tensors computed.

    glibc serves allocations below its (adaptive, up to 32 MiB) mmap threshold from a heap that keeps
    freed blocks; tensors of many sizes fragment it, and the stream's resident memory creeps up by a
    few hundred MB although little is live. Trimming per tensor would re-fault every page (seconds on
    a full-size model); every 256 MiB keeps reuse and bounds the creep. A no-op elsewhere.
    """

    def __init__(self, every: int = 256 * 1024 * 1024) -> None:
        self._every = every
        self._pending = 0
        self._trim: Any = None
        if sys.platform.startswith("linux"):
            try:
                self._trim = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError):
                self._trim = None

    def account(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._trim is not None and self._pending >= self._every:
            self._pending = 0
            self._trim(0)


class StreamWriter:
    """All output files of one stream: headers written at construction, then two workers.

    A background thread (``start_copier``) copies every tensor whose bytes can be copied verbatim,
    in runs, while the caller is still importing diffusers and loading LoRAs; ``finish`` claims the
    tensors the fuse targets (the copier skips claimed ones; one it already copied is simply
    rewritten), computes every tensor that is not a verbatim copy, then waits for the copier. Each
    file's writeback is started as soon as its verbatim part is done, so the final fsync is short,
    and each file is hashed on the way (``hasher``): ``hashes`` after ``finish``.
    """

    def __init__(
        self,
        root: Path,
        outs: Sequence[OutFile],
        reader: PositionalReader,
        metadata: Mapping[str, str],
        peft_order: bool = True,
    ) -> None:
        """``peft_order``: the pipeline route fuses in float32, so every fused tensor reproduces PEFT's
        float operations (False for half-precision bases: see ``fuse_math.fused_weight``)."""
        self._peft_order = peft_order
        self._outs = list(outs)
        self._reader = reader
        self._writers: list[SafetensorsWriter] = []
        try:
            for out in self._outs:
                path = root / out.rel if out.rel else root
                path.parent.mkdir(parents=True, exist_ok=True)
                self._writers.append(SafetensorsWriter(path, [t.entry for t in out.tensors], metadata))
        except BaseException:
            self._close_all(check=False)
            raise
        self._verbatim = [[_verbatim_source(t) for t in out.tensors] for out in self._outs]
        self._lock = threading.Condition()
        self._claimed: set[tuple[int, str]] = set()
        self._in_flight: set[tuple[int, str]] = set()
        self._copied: set[tuple[int, str]] = set()
        self._stop = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        #: sha256 and size of each output file (by path), computed while it was written
        self.hashes: dict[Path, tuple[str, int]] = {}

    def start_copier(self) -> None:
        self._thread = threading.Thread(target=self._copy_all, name="lorarecipe-stream-copy", daemon=True)
        self._thread.start()

    def _next_run(self, index: int, start: int) -> tuple[list[int], int]:
        """Under the lock: the longest run from ``start`` of unclaimed verbatim tensors, adjacent in both
        files (at most 256 MiB), marked in flight; and where to continue."""
        out, verbatim = self._outs[index], self._verbatim[index]
        run: list[int] = []
        end = -1
        size = 0
        position = start
        while position < len(out.tensors) and size < _RUN_BYTES:
            raw, key = verbatim[position], out.tensors[position].key
            if raw is None or (index, key) in self._claimed or (run and raw[1] != end):
                break
            run.append(position)
            end, size = raw[1] + raw[2], size + raw[2]
            position += 1
        self._in_flight.update((index, out.tensors[p].key) for p in run)
        return run, (position if run else start + 1)

    def _copy_all(self) -> None:
        try:
            for index, (out, writer) in enumerate(zip(self._outs, self._writers, strict=True)):
                position = 0
                while position < len(out.tensors):
                    with self._lock:
                        if self._stop:
                            return
                        run, position = self._next_run(index, position)
                    if not run:
                        continue
                    keys = [out.tensors[p].key for p in run]
                    source = self._verbatim[index][run[0]]
                    assert source is not None
                    try:
                        writer.copy_range(self._reader, source[0], source[1], keys)
                    finally:
                        with self._lock:
                            done = {(index, k) for k in keys}
                            self._in_flight -= done
                            self._copied |= done
                            self._lock.notify_all()
                writer.datasync()
        except BaseException as exc:  # reported by finish()
            self._error = exc

    def finish(self, targets: Mapping[tuple[str, str], FuseTarget], stats: WriteStats) -> None:
        """Write every tensor the copier does not (fused or converted ones), then close all files."""
        import torch

        touched = {
            (i, t.key)
            for i, out in enumerate(self._outs)
            for t in out.tensors
            if any((p.component, p.key) in targets for p in t.parts)
        }
        hasher = OutputHasher(self._writers, [[t.key for t in out.tensors] for out in self._outs], touched)
        for index, writer in enumerate(self._writers):
            writer.on_written = functools.partial(hasher.notify, index)
        with self._lock:
            self._claimed |= touched
            for slot in self._copied - touched:  # copied before the targets were known, and final
                hasher.notify(slot[0], slot[1], False)
        hasher.start()
        ok = False
        trimmer = _HeapTrimmer()
        scratch = Scratch()  # temporaries reused from tensor to tensor (no page faults)
        behind = WriteBehind()  # computing the next tensor overlaps writing this one
        try:
            for index, (out, writer) in enumerate(zip(self._outs, self._writers, strict=True)):
                for position, tensor in enumerate(out.tensors):
                    stats.tensors += 1
                    slot = (index, tensor.key)
                    if self._verbatim[index][position] is not None and slot not in touched:
                        if self._thread is None:  # no copier: copy here, one tensor at a time
                            raw = self._verbatim[index][position]
                            assert raw is not None
                            writer.copy_range(self._reader, raw[0], raw[1], [tensor.key])
                        continue
                    with self._lock:
                        while slot in self._in_flight:
                            self._lock.wait()
                    trimmer.account(4 * tensor.entry.nbytes)  # roughly what computing it allocates
                    # a float32 tensor of a half-precision build (a module diffusers keeps in float32)
                    # is fused in float32 by the pipeline route too: PEFT's order
                    order = self._peft_order or tensor.dtype == "F32"
                    with torch.no_grad():
                        chunked = write_chunked(
                            self._reader, writer, tensor, targets, stats, behind, scratch, order
                        )
                        if chunked:
                            continue
                        result = compute(self._reader, tensor, targets, stats, scratch, order)
                    data = as_bytes(result)
                    behind.submit(functools.partial(writer.write, tensor.key, data), data.nbytes)
                    del result, data
            behind.close()
            if self._thread is not None:
                self._thread.join()
                if self._error is not None:
                    raise self._error
            self.hashes = hasher.result()
            ok = True
        finally:
            if not ok:
                with contextlib.suppress(BaseException):
                    behind.close()  # the writes queued before the failure finish before files close
                hasher.stop()
            self._stop_copier()
            self._close_all(check=ok)

    def _stop_copier(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            with self._lock:
                self._stop = True
            self._thread.join()

    def abort(self) -> None:
        """Stop the copier and close the files (the caller's atomic context deletes them)."""
        self._stop_copier()
        self._close_all(check=False)

    def _close_all(self, check: bool) -> None:
        writers, self._writers = self._writers, []
        for writer in writers:
            try:
                writer.close()
            except BuildError:
                if check:
                    raise
