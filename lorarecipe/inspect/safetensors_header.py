"""A ``.safetensors`` path -> a validated :class:`SafetensorsHeader` (names, dtypes, shapes, offsets).

Reads the 8-byte length and the JSON header with plain file reads, and nothing else: no mmap, no
tensor bytes, no torch. Every malformed or unsafe input (pickle, absurd header, overlapping or
out-of-file offsets, sizes that do not match the shape) becomes an :class:`UnsafeInputError`
naming the file and the problem, so ``validate`` can refuse a file before anything loads it.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import InputUnavailableError, UnsafeInputError
from ..fs.json_files import parse_json

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_VALUES",
    "PICKLE_SUFFIXES",
    "SafetensorsHeader",
    "TensorInfo",
    "parse_header_bytes",
    "read_header",
]

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
#: Real headers are well under 1 MB (a 3,000-tensor LyCORIS file: 250 KB); 8 MiB leaves room for
#: large training metadata while bounding what a junk header costs to refuse (measured in the tests).
MAX_HEADER_BYTES = 8 * 1024 * 1024
#: JSON values (keys, scalars, containers) in a header: ~12 per tensor, so ~40,000 tensors. Counted on
#: the raw bytes before parsing, so a header of tiny values cannot expand 20x into Python objects.
MAX_HEADER_VALUES = 500_000
#: A header nests three levels: the tensor table, an entry, its shape or offsets.
_HEADER_DEPTH = 3
_MAX_BITS = 8 << 64
MAX_DIMS = 16  # real tensors have <= 5; a longer shape is garbage, not a model

#: Bits per element of every dtype safetensors 0.8 knows (its Rust ``Dtype`` enum, 22 variants).
DTYPE_BITS: Mapping[str, int] = MappingProxyType(
    {
        "BOOL": 8,
        "U8": 8,
        "I8": 8,
        "F8_E5M2": 8,
        "F8_E4M3": 8,
        "F8_E8M0": 8,
        "F8_E4M3FNUZ": 8,
        "F8_E5M2FNUZ": 8,
        "F4": 4,
        "F6_E2M3": 6,
        "F6_E3M2": 6,
        "I16": 16,
        "U16": 16,
        "F16": 16,
        "BF16": 16,
        "I32": 32,
        "U32": 32,
        "F32": 32,
        "I64": 64,
        "U64": 64,
        "F64": 64,
        "C64": 64,
    }
)

_JSON_SPACE = (b" ", b"\t", b"\n", b"\r")
_JSON_SPACE_TEXT = " \t\n\r"
_PICKLE_HINT = "lorarecipe never loads pickle files: convert it to .safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of the header; ``start``/``end`` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensor entries by name and the ``__metadata__`` strings."""

    path: str
    file_size: int
    header_size: int
    tensors: Mapping[str, TensorInfo] = field(hash=False)  # mappings are not hashable; equality
    metadata: Mapping[str, str] = field(hash=False)  # still compares them

    @property
    def data_offset(self) -> int:
        return 8 + self.header_size

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.nbytes for t in self.tensors.values()), default=0)

    @property
    def total_tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _unsafe(path: str, problem: str) -> UnsafeInputError:
    return UnsafeInputError(f"{path}: {problem}")


def _looks_like_pickle(prefix: bytes | bytearray) -> bool:
    """Pickle protocol 2+ starts with 0x80 <proto>; torch's zip checkpoints with ``PK\\x03\\x04``."""
    if prefix[:4] == b"PK\x03\x04":
        return True
    return len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5


def read_header(path: Path | str, *, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Path -> validated header. Reads at most ``8 + header_size`` bytes; never the tensor data."""
    shown = str(path)
    if shown.lower().endswith(PICKLE_SUFFIXES):
        raise _unsafe(shown, f"is a pickle/PyTorch checkpoint; {_PICKLE_HINT}")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputUnavailableError(f"{shown}: file not found") from None
    except OSError as exc:
        raise _unsafe(shown, f"cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise _unsafe(shown, "is a directory, not a .safetensors file")
    if not stat.S_ISREG(info.st_mode):
        raise _unsafe(shown, "is not a regular file")
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(9)
            data: bytes | bytearray = prefix
            if len(prefix) >= 8:
                (length,) = struct.unpack("<Q", prefix[:8])
                if 0 < length <= max_header_bytes and length <= file_size - 8:
                    data = _read_exactly(handle, prefix, 8 + length)  # one buffer, no copies
    except OSError as exc:
        raise _unsafe(shown, f"cannot be read ({exc.strerror or exc})") from None
    return parse_header_bytes(data, file_size, shown, max_header_bytes=max_header_bytes)


def _read_exactly(handle: Any, prefix: bytes, size: int) -> bytearray:
    """``prefix`` + the next bytes of ``handle`` up to ``size``, in one preallocated buffer filled by
    1 MiB reads (no whole-header copies); a file that shrank meanwhile gives a shorter buffer."""
    buffer = bytearray(size)
    buffer[: len(prefix)] = prefix
    done = len(prefix)
    while done < size:
        chunk = handle.read(min(size - done, 1 << 20))
        if not chunk:
            del buffer[done:]
            break
        buffer[done : done + len(chunk)] = chunk
        done += len(chunk)
    return buffer


def parse_header_bytes(
    data: bytes | bytearray,
    file_size: int,
    path: str = "<bytes>",
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> SafetensorsHeader:
    """The first ``8 + header_size`` bytes of a file (and its size) -> validated header."""
    if len(data) < 8 or file_size < 8:
        if _looks_like_pickle(data):
            raise _unsafe(path, f"is a pickle/PyTorch checkpoint; {_PICKLE_HINT}")
        raise _unsafe(
            path, f"is {file_size} bytes long, too short for a safetensors file (8-byte header length)"
        )
    (length,) = struct.unpack("<Q", data[:8])
    # A real safetensors header is JSON starting with '{'; only when it is not do the magic
    # bytes of pickle/zip decide (a header length can legitimately start with 0x80).
    plausible = 0 < length <= min(max_header_bytes, file_size - 8) and data[8:9] in (b"{", *_JSON_SPACE)
    if not plausible and _looks_like_pickle(data):
        raise _unsafe(path, f"is a pickle/PyTorch checkpoint; {_PICKLE_HINT}")
    if length == 0:
        raise _unsafe(path, "header length is 0; not a safetensors file")
    if length > max_header_bytes:
        raise _unsafe(path, f"header length {length} bytes exceeds the limit of {max_header_bytes} bytes")
    if length > file_size - 8:
        raise _unsafe(path, f"header length {length} bytes is larger than the file ({file_size} bytes)")
    if len(data) < 8 + length:
        raise _unsafe(path, f"file ends inside its {length}-byte header")
    values = _count_values(data, 8, 8 + length)
    if values > MAX_HEADER_VALUES:
        raise _unsafe(
            path,
            f"header has {values} JSON separators (limit: {MAX_HEADER_VALUES} values); not safetensors",
        )
    with memoryview(data) as view:
        header = _decode_json(view[8 : 8 + length], path)
    return _validate(header, path, file_size, length)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _count_values(data: bytes | bytearray, start: int, end: int) -> int:
    """An upper bound of the JSON values (keys, scalars, containers) in ``data[start:end]``: its
    separators and openers, counted in place (no copy, no parsing) before anything is built."""
    return sum(data.count(c, start, end) for c in (b",", b":", b"{", b"[")) + 1


def _decode_json(raw: memoryview, path: str) -> dict[str, Any]:
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise _unsafe(path, f"header is not UTF-8 (byte {exc.start})") from None
    if not text.lstrip(_JSON_SPACE_TEXT).startswith("{"):
        raise _unsafe(path, "header is not a JSON object (it must start with '{'); not a safetensors file")
    try:
        value = parse_json(
            text,
            f"{path}: header",
            max_depth=_HEADER_DEPTH,
            expect=dict,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_no_constant,
        )
    except _DuplicateKey as exc:
        raise _unsafe(path, f"header has the key {exc.key!r} twice") from None
    except ValueError as exc:
        raise _unsafe(path, f"header is not valid JSON ({_short(str(exc))})") from None
    return value  # type: ignore[no-any-return]


def _check_text(text: str, path: str, what: str) -> None:
    """JSON's \\ud800 escapes decode to lone surrogates, which no file name or terminal accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _unsafe(path, f"{what} contains an invalid \\u escape (a lone surrogate)") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _validate(header: dict[str, Any], path: str, file_size: int, header_size: int) -> SafetensorsHeader:
    data_size = file_size - 8 - header_size
    metadata = _validate_metadata(header.pop("__metadata__", None), path)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        _check_text(name, path, "a tensor name")
        tensors[name] = _validate_entry(name, entry, path, data_size)
    _check_coverage(tensors, path, data_size)
    return SafetensorsHeader(
        path=path,
        file_size=file_size,
        header_size=header_size,
        tensors=MappingProxyType(tensors),
        metadata=MappingProxyType(metadata),
    )


def _validate_metadata(raw: Any, path: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _unsafe(path, "__metadata__ is not a JSON object of strings")
    for key, value in raw.items():
        _check_text(key, path, "a __metadata__ key")
        if not isinstance(value, str):
            raise _unsafe(path, f"__metadata__[{_short(key, 60)!r}] is {type(value).__name__}, not a string")
        _check_text(value, path, f"__metadata__[{_short(key, 60)!r}]")
    return dict(raw)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_entry(name: str, entry: Any, path: str, data_size: int) -> TensorInfo:
    where = f"tensor {_short(name, 80)!r}"
    if not isinstance(entry, dict):
        raise _unsafe(path, f"{where}: entry is not a JSON object")
    for required in ("dtype", "shape", "data_offsets"):
        if required not in entry:
            raise _unsafe(path, f"{where}: missing {required!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _unsafe(path, f"{where}: unknown dtype {_short(repr(dtype), 40)}")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise _unsafe(path, f"{where}: shape must be a list of integers")
    if len(shape) > MAX_DIMS:
        raise _unsafe(path, f"{where}: shape has {len(shape)} dimensions (limit {MAX_DIMS})")
    if any(d < 0 for d in shape):
        raise _unsafe(path, f"{where}: negative dimension in shape {shape}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _unsafe(path, f"{where}: data_offsets must be [start, end] integers")
    start, end = offsets
    if not 0 <= start <= end:
        raise _unsafe(path, f"{where}: data_offsets [{start}, {end}] must satisfy 0 <= start <= end")
    if end > data_size:
        raise _unsafe(path, f"{where}: data ends at byte {end}, beyond the {data_size}-byte data section")
    expected = _expected_bytes(shape, DTYPE_BITS[dtype], data_size, where, path)
    if end - start != expected:
        shown = _short(str(shape), 60)
        raise _unsafe(
            path, f"{where}: {end - start} bytes stored, but shape {shown} of {dtype} needs {expected}"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=start, end=end)


def _expected_bytes(shape: list[int], bits: int, data_size: int, where: str, path: str) -> int:
    """Bytes for ``shape``; stops multiplying past 2**64 bytes (no runaway products)."""
    if 0 in shape:
        return 0
    total = bits
    for dim in shape:
        total *= dim
        if total > _MAX_BITS:
            raise _unsafe(
                path,
                f"{where}: shape {_short(str(shape), 60)} is absurdly large "
                f"(over 2**64 bytes; the data section has {data_size})",
            )
    if total % 8:
        raise _unsafe(path, f"{where}: {total} bits of sub-byte data do not fill whole bytes")
    return total // 8


def _check_coverage(tensors: Mapping[str, TensorInfo], path: str, data_size: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no hole, nothing trailing."""
    position = 0
    previous: TensorInfo | None = None
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start < position and previous is not None:
            raise _unsafe(
                path, f"tensor {_short(info.name, 80)!r} overlaps tensor {_short(previous.name, 80)!r}"
            )
        if info.start > position:
            raise _unsafe(
                path,
                f"bytes {position}..{info.start} of the data section belong to no tensor "
                "(safetensors forbids holes)",
            )
        position = max(position, info.end)
        if info.nbytes:
            previous = info
    if position != data_size:
        raise _unsafe(
            path,
            f"{data_size - position} trailing bytes after the last tensor "
            "(the data section is not fully covered)",
        )
