"""Rendered grid cells kept between builds, keyed by everything their pixels depend on.

A batch of cells (one column × up to ``BATCH`` rows, rendered together: a batch is the unit whose
pixels are reproducible) -> a key: the content hashes of the base (and its config folder) and of the
LoRA files the column uses, the plan steps the column depends on (merges, the mix, the fuse), the
column (adapters, weights, ``lora_scale``), the prompts as used (trigger words included), negative
prompt, seeds, steps, guidance, size, render threads, the pipeline's dtype and device, and the library
versions. The scheduler config is part of the base's content hash. An entry holds the cells' pixels
as PNG (lossless: the cells decode to the same pixels, so a grid built from the cache is
byte-identical to one rendered afresh) and, for a ``fused`` batch, its largest difference from the
runtime equivalent. Entries live in ``$LORARECIPE_CACHE/grid-cells``, are written atomically, are
plain JSON (never unpickled) and are checked on read (key, hash of the pixels, count, size): a bad
entry is re-rendered, never trusted. Deleting the folder is safe.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...fs.atomic import atomic_write_bytes, cache_root
from ...plan import canonical_json

__all__ = ["CachedBatch", "CellCache", "batch_key"]

CELLS_FORMAT = 1


@dataclass(frozen=True)
class CachedBatch:
    """The pixels of one batch of cells (PIL images) and, for a fused batch, its fused-vs-runtime
    largest difference."""

    images: list[Any]
    fused_vs_runtime: float | None = None


def batch_key(context: Mapping[str, Any], column: Mapping[str, Any], rows: Sequence[tuple[str, int]]) -> str:
    """sha256 of what one batch's pixels depend on (``context``: the grid and pipeline; ``column``:
    the variant and the plan steps it uses; ``rows``: (prompt as used, seed))."""
    doc = {"format": CELLS_FORMAT, "context": context, "column": column, "rows": [list(r) for r in rows]}
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class CellCache:
    """Batches of rendered cells under ``root`` (default ``$LORARECIPE_CACHE/grid-cells``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root() / "grid-cells"

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str, count: int, size: tuple[int, int] | None) -> CachedBatch | None:
        """The batch stored under ``key`` if it is intact (``count`` RGB images of ``size``), else None."""
        from PIL import Image

        try:
            doc = json.loads(self._path(key).read_text(encoding="utf-8"))
            if doc.get("format") != CELLS_FORMAT or doc.get("key") != key:
                return None
            blobs = [base64.b64decode(b, validate=True) for b in doc["images"]]
            if hashlib.sha256(b"".join(blobs)).hexdigest() != doc["sha256"] or len(blobs) != count:
                return None
            images = []
            for blob in blobs:
                with Image.open(io.BytesIO(blob), formats=["PNG"]) as image:
                    image.load()
                    if image.mode != "RGB" or (size is not None and image.size != size):
                        return None
                    images.append(image.copy())
            diff = doc.get("fused_vs_runtime")
            if diff is not None and not isinstance(diff, float):
                return None
            return CachedBatch(images, diff)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, Image.DecompressionBombError):
            return None

    def put(self, key: str, batch: CachedBatch) -> None:
        """Store a batch (best effort: a full disk or a read-only cache only costs a re-render)."""
        blobs = [_png(image) for image in batch.images]
        doc = {
            "format": CELLS_FORMAT,
            "key": key,
            "sha256": hashlib.sha256(b"".join(blobs)).hexdigest(),
            "images": [base64.b64encode(b).decode("ascii") for b in blobs],
            "fused_vs_runtime": batch.fused_vs_runtime,
        }
        with contextlib.suppress(OSError):
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps(doc).encode())
