"""Add provenance to a safetensors file's ``__metadata__`` by rewriting its header (torch-free).

File + {key: text} -> the same tensors, bit for bit, with the extra metadata. The data section is
copied in 8 MiB chunks into a temporary file that replaces the original atomically, so memory stays
flat and a crash never leaves a half-written file. Used for every safetensors output, so that a
file that travels alone can still say which recipe and plan produced it.

Headers are always written canonically (metadata keys sorted, tensors in data order): safetensors
keeps metadata in a randomly seeded hash map, so without this the same build gives different bytes
in different processes.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

from ..errors import UnsafeInputError
from ..fs.atomic import atomic_file
from ..fs.json_files import parse_json

__all__ = ["PROVENANCE_PREFIX", "add_metadata", "canonicalize_header", "jsonable", "read_metadata"]

PROVENANCE_PREFIX = "lorarecipe."
_CHUNK = 8 * 1024 * 1024


def _read_header(handle: object, path: Path) -> tuple[int, dict[str, object]]:
    raw = handle.read(8)  # type: ignore[attr-defined]
    if len(raw) != 8:
        raise UnsafeInputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (size,) = struct.unpack("<Q", raw)
    if size > 100 * 1024 * 1024:
        raise UnsafeInputError(f"{path}: safetensors header of {size} bytes is too large")
    raw = handle.read(size)  # type: ignore[attr-defined]
    where = f"{path}: safetensors header"
    header = parse_json(raw, where, max_bytes=size, error=UnsafeInputError, expect=dict)
    return size, header


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file."""
    with open(path, "rb") as handle:
        _size, header = _read_header(handle, path)
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def jsonable(value: object) -> object:
    """Sets -> sorted lists, recursively (LoraConfig.to_dict() holds sets, whose order varies per process)."""
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _canonical(header: dict[str, object]) -> bytes:
    meta = header.get("__metadata__")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}

    def start(item: tuple[str, object]) -> tuple[int, str]:
        offsets = item[1].get("data_offsets", [0]) if isinstance(item[1], dict) else [0]
        return (int(offsets[0]) if offsets else 0, item[0])

    ordered: dict[str, object] = {}
    if isinstance(meta, dict):
        ordered["__metadata__"] = dict(sorted((str(k), str(v)) for k, v in meta.items()))
    ordered.update(sorted(tensors.items(), key=start))
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def canonicalize_header(path: Path) -> None:
    """Rewrite the header canonically in place (same length, space padded) or, if longer, by copy."""
    with open(path, "rb") as src:
        size, header = _read_header(src, path)
    encoded = _canonical(header)
    if len(encoded) <= size:
        with open(path, "r+b") as dst:
            dst.seek(8)
            dst.write(encoded + b" " * (size - len(encoded)))
        return
    add_metadata(path, {})


def add_metadata(path: Path, extra: Mapping[str, str]) -> None:
    """Merge ``extra`` into the file's ``__metadata__`` (tensors untouched), atomically."""
    with open(path, "rb") as src:
        _size, header = _read_header(src, path)
        meta = dict(header.get("__metadata__") or {})  # type: ignore[call-overload]
        meta.update({str(k): str(v) for k, v in extra.items()})
        header["__metadata__"] = meta
        encoded = _canonical(header)
        encoded += b" " * (-len(encoded) % 8)  # keep the data section 8-byte aligned, as safetensors does
        with atomic_file(path) as tmp, open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(encoded)))
            dst.write(encoded)
            shutil.copyfileobj(src, dst, _CHUNK)
