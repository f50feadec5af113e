"""Positional reads and writes of safetensors files: byte ranges in, byte ranges out, torch-free.

Reads use ``os.preadv`` into a fresh buffer (never mmap: mapped pages count against the process's
resident memory, so a mmap reader of a 7 GB checkpoint "uses" 7 GB). Untouched byte ranges are copied
file to file by the kernel (``os.copy_file_range``) without passing through the process at all. An
output file gets its whole header up front (canonical: metadata keys sorted, tensors in data order,
padded to 8 bytes, as ``lorarecipe.safetensors_meta`` writes it), so tensors can then be written in
any order at their final offsets and two builds give identical bytes.
"""

from __future__ import annotations

import collections
import json
import os
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import BuildError
from ...inspect.safetensors_header import DTYPE_BITS

__all__ = ["OutputEntry", "PositionalReader", "SafetensorsWriter", "WriteBehind"]

_CHUNK = 64 * 1024 * 1024  # largest single copy/read request (bounded memory for the fallback path)


class PositionalReader:
    """Cached read-only descriptors (thread-safe); ``read`` returns exactly ``length`` bytes at ``offset``."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        key = str(path)
        with self._lock:
            if key not in self._fds:
                self._fds[key] = os.open(key, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            return self._fds[key]

    def read(self, path: Path, offset: int, length: int) -> bytearray:
        buffer = bytearray(length)
        self.read_into(path, offset, memoryview(buffer))
        return buffer

    def read_into(self, path: Path, offset: int, view: memoryview) -> None:
        """Fill ``view`` (writable bytes) with the file's bytes at ``offset``."""
        length = view.nbytes
        fd = self.fd(path)
        done = 0
        while done < length:
            if hasattr(os, "preadv"):
                count = os.preadv(fd, [view[done : done + _CHUNK]], offset + done)
            else:  # pragma: no cover - platforms without preadv
                data = os.pread(fd, min(_CHUNK, length - done), offset + done)
                view[done : done + len(data)] = data
                count = len(data)
            if count <= 0:
                raise BuildError(f"{path}: file ends at byte {offset + done}, inside a tensor (truncated?)")
            done += count

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass(frozen=True)
class OutputEntry:
    """One tensor of an output file, in data order."""

    key: str
    dtype: str  # safetensors dtype name (F32, F16, BF16, I64, ...)
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPE_BITS[self.dtype] // 8


def header_bytes(entries: Sequence[OutputEntry], metadata: Mapping[str, str]) -> tuple[bytes, list[int]]:
    """Canonical header (8-byte length + JSON, space padded to 8) and each entry's data offset."""
    doc: dict[str, object] = {"__metadata__": dict(sorted((str(k), str(v)) for k, v in metadata.items()))}
    offsets: list[int] = []
    position = 0
    for entry in entries:
        offsets.append(position)
        end = position + entry.nbytes
        doc[entry.key] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [position, end]}
        position = end
    encoded = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded, offsets


class SafetensorsWriter:
    """An output file whose header is fixed up front; tensors are then written at their offsets.

    ``close`` verifies that every tensor was written (a hole would be zeros, silently), then closes
    the descriptor; fsync and rename are the caller's (atomic_file/dir). Writes are positional, so
    several threads may write different tensors of one file.
    """

    def __init__(self, path: Path, entries: Sequence[OutputEntry], metadata: Mapping[str, str]) -> None:
        if len({e.key for e in entries}) != len(entries):
            raise BuildError(f"{path.name}: duplicate tensor names in the output plan")
        header, offsets = header_bytes(entries, metadata)
        self.path = path
        self.header = header
        #: told ``(key, computed)`` each time a tensor's bytes are all written (``computed``: by
        #: ``write``/``write_part``, else by ``copy_range``); the output hasher follows it
        self.on_written: Callable[[str, bool], None] | None = None
        self._base = len(header)
        self._slots = {e.key: (self._base + off, e.nbytes) for e, off in zip(entries, offsets, strict=True)}
        self._written: set[str] = set()
        self._partial: dict[str, int] = {}
        self._fd = os.open(
            str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644
        )
        total = self._base + sum(e.nbytes for e in entries)
        os.ftruncate(self._fd, total)
        self._pwrite_all(header, 0)
        self.total_bytes = total

    def slot(self, key: str) -> tuple[int, int]:
        """(absolute offset, size) of a tensor's bytes in the file."""
        return self._slots[key]

    def _pwrite_all(self, data: memoryview | bytes | bytearray, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done : done + _CHUNK], offset + done)

    def write(self, key: str, data: memoryview | bytes | bytearray) -> None:
        """Write all bytes of tensor ``key``."""
        start, size = self._slots[key]
        length = memoryview(data).nbytes
        if length != size:
            raise BuildError(f"{self.path.name}: {key}: {length} bytes for a {size}-byte tensor")
        self._pwrite_all(data, start)
        self._written.add(key)
        if self.on_written is not None:
            self.on_written(key, True)

    def write_part(self, key: str, at: int, data: memoryview | bytes | bytearray) -> None:
        """Write bytes ``[at, at + len)`` of tensor ``key``; it counts as written once all bytes were."""
        start, size = self._slots[key]
        length = memoryview(data).nbytes
        if at < 0 or at + length > size:
            raise BuildError(f"{self.path.name}: {key}: bytes {at}..{at + length} of a {size}-byte tensor")
        self._pwrite_all(data, start + at)
        self._partial[key] = self._partial.get(key, 0) + length
        if self._partial[key] == size:
            self._written.add(key)
            if self.on_written is not None:
                self.on_written(key, True)

    def copy_range(self, reader: PositionalReader, src: Path, src_offset: int, keys: Sequence[str]) -> None:
        """Copy the bytes of consecutive tensors ``keys`` (adjacent in this file) from ``src`` verbatim."""
        start = self._slots[keys[0]][0]
        length = sum(self._slots[k][1] for k in keys)
        if self._slots[keys[-1]][0] + self._slots[keys[-1]][1] - start != length:
            raise BuildError(f"{self.path.name}: tensors {keys[0]}..{keys[-1]} are not adjacent")
        fd_in = reader.fd(src)
        done = 0
        while done < length:
            step = min(_CHUNK, length - done)
            count = 0
            if hasattr(os, "copy_file_range"):
                try:
                    count = os.copy_file_range(fd_in, self._fd, step, src_offset + done, start + done)
                except OSError:
                    count = 0
            if count <= 0:
                data = reader.read(src, src_offset + done, step)
                self._pwrite_all(data, start + done)
                count = step
            done += count
        self._written.update(keys)
        if self.on_written is not None:
            for key in keys:
                self.on_written(key, False)

    def datasync(self) -> None:
        """Start (and wait for) writeback of what was written so far, so the final fsync is short."""
        sync = getattr(os, "fdatasync", os.fsync)
        sync(self._fd)

    def close(self) -> None:
        os.close(self._fd)
        missing = [k for k in self._slots if k not in self._written]
        if missing:
            raise BuildError(f"{self.path.name}: {len(missing)} tensors were never written: {missing[:5]}")


class WriteBehind:
    """A thread that runs the writes handed to it, in order, so the caller computes the next tensor
    while the kernel takes this one (writes into the page cache block when the kernel throttles
    dirty pages: seconds on a multi-GB output). At most ``limit`` bytes wait (or one write of any
    size), which bounds the memory it holds. The first error is raised by ``submit`` or ``close``.
    """

    def __init__(self, limit: int = 16 * 1024 * 1024) -> None:
        self._cond = threading.Condition()
        self._items: collections.deque[tuple[Callable[[], None], int]] = collections.deque()
        self._bytes = 0
        self._limit = limit
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lorarecipe-stream-write", daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[], None], nbytes: int) -> None:
        with self._cond:
            while self._items and self._bytes + nbytes > self._limit and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            self._items.append((write, nbytes))
            self._bytes += nbytes
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                write, nbytes = self._items[0]
                failed = self._error is not None
            try:
                if not failed:
                    write()
            except BaseException as exc:  # handed to the caller by submit/close
                with self._cond:
                    self._error = exc
            with self._cond:
                self._items.popleft()
                self._bytes -= nbytes
                self._cond.notify_all()

    def close(self) -> None:
        """Wait until every queued write ran; raise the first error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self._error is not None:
            raise self._error
