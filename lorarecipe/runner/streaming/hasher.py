"""sha256 of every streamed output file, computed while the stream writes it, on another core.

Output files (headers fixed up front, tensors written at fixed offsets in any order) -> each file's
sha256 and size, for the manifest and the incremental state, without reading a multi-GB output
again after the build. A thread hashes each file in order: the header from memory, then each tensor
as soon as its final bytes are written (a tensor the fuse targets counts only once the computed
bytes are written, not the verbatim copy the copier may have made earlier), read back from the page
cache. hashlib releases the GIL on large updates, so the hashing overlaps the fuse arithmetic.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from ...errors import BuildError
from .positional_io import SafetensorsWriter

__all__ = ["OutputHasher"]

_READ = 16 * 1024 * 1024


class OutputHasher:
    """Follows the writes of ``writers`` (``notify``) and hashes each file once it is final."""

    def __init__(
        self,
        writers: Sequence[SafetensorsWriter],
        order: Sequence[Sequence[str]],
        touched: set[tuple[int, str]],
    ) -> None:
        self._writers = list(writers)
        self._order = [list(keys) for keys in order]
        self._touched = touched
        self._done: set[tuple[int, str]] = set()
        self._cond = threading.Condition()
        self._stop = False
        self._error: BaseException | None = None
        self.hashes: dict[Path, tuple[str, int]] = {}
        self._thread = threading.Thread(target=self._run, name="lorarecipe-stream-hash", daemon=True)

    def notify(self, index: int, key: str, computed: bool) -> None:
        """A tensor's bytes are all written; a targeted one is final only when ``computed``."""
        if computed or (index, key) not in self._touched:
            with self._cond:
                self._done.add((index, key))
                self._cond.notify_all()

    def start(self) -> None:
        self._thread.start()

    def _wait(self, slot: tuple[int, str]) -> bool:
        with self._cond:
            while slot not in self._done and not self._stop:
                self._cond.wait()
            return not self._stop

    def _run(self) -> None:
        try:
            for index, writer in enumerate(self._writers):
                digest = hashlib.sha256(writer.header)
                fd = os.open(str(writer.path), os.O_RDONLY | getattr(os, "O_BINARY", 0))
                try:
                    for key in self._order[index]:
                        if not self._wait((index, key)):
                            return
                        start, size = writer.slot(key)
                        done = 0
                        while done < size:
                            chunk = os.pread(fd, min(_READ, size - done), start + done)
                            if not chunk:
                                raise BuildError(f"{writer.path.name}: {key} ends early while hashing")
                            digest.update(chunk)
                            done += len(chunk)
                finally:
                    os.close(fd)
                self.hashes[writer.path] = (digest.hexdigest(), writer.total_bytes)
        except BaseException as exc:  # reported by result()
            self._error = exc

    def result(self) -> dict[Path, tuple[str, int]]:
        """Wait for every file's hash; raises the first error."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.hashes

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
