"""Hypothesis strategies for malformed safetensors LoRA files, shared by the tests and ``fuzz/run.py``.

A valid LoRA file (a built-in) is broken in two ways:

- *raw* mutations edit bytes or the header JSON without fixing the layout, as a truncated download,
  a corrupted disk or a hand-made hostile file would: truncation, absurd header lengths, bytes
  flipped in the header, garbage JSON, duplicated keys, overlapping or out-of-range offsets, unknown
  dtypes, shapes that do not match the bytes;
- *consistent* mutations re-lay the file so that the header is valid safetensors and only the
  content is wrong, which gets past header checks into diffusers/peft: tensors reshaped,
  transposed, sliced to another rank, retyped (F32 bytes as I32/F16/U8…), renamed, dropped, added,
  NaN/Inf values, hostile ``__metadata__`` (diffusers parses ``lora_adapter_metadata`` as JSON).

``check_*`` functions are the properties: only a :class:`~lorarecipe.errors.LorarecipeError` with a
message may come out, never another exception.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from lorarecipe.errors import LorarecipeError
from lorarecipe.inspect import inspect_lora, read_header
from lorarecipe.inspect.safetensors_header import DTYPE_BITS

__all__ = [
    "Malformed",
    "Tensor",
    "check_header_never_crashes",
    "check_load_never_crashes",
    "join",
    "malformed_files",
    "split",
]

_JSON_SPACE = b" "


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class Malformed:
    """One generated file: what was done to it and its bytes (shown short in failure reports)."""

    kind: str
    data: bytes

    def __repr__(self) -> str:
        return f"Malformed({self.kind!r}, {len(self.data)} bytes, starts {self.data[:160]!r})"


def split(blob: bytes) -> tuple[dict[str, str], list[Tensor]]:
    """A valid safetensors file -> (metadata, tensors in file order)."""
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    data = blob[8 + length :]
    metadata = header.pop("__metadata__", {}) or {}
    tensors = [
        Tensor(
            name,
            entry["dtype"],
            tuple(entry["shape"]),
            data[entry["data_offsets"][0] : entry["data_offsets"][1]],
        )
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    ]
    return metadata, tensors


def _header_bytes(header: dict[str, Any]) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + _JSON_SPACE * (-len(text) % 8)


def join(metadata: dict[str, Any] | None, tensors: list[Tensor]) -> bytes:
    """(metadata, tensors) -> a file laid out as safetensors writes it (contiguous, padded header)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(tensor.data)],
        }
        offset += len(tensor.data)
    raw = _header_bytes(header)
    return struct.pack("<Q", len(raw)) + raw + b"".join(t.data for t in tensors)


def _raw_header(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def _with_raw_header(header: dict[str, Any], data: bytes) -> bytes:
    raw = _header_bytes(header)
    return struct.pack("<Q", len(raw)) + raw + data


# ---- raw mutations: the header no longer matches the bytes ----

_JSON_JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**65), 2**65)
    | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
_DTYPES = st.one_of(
    st.sampled_from(sorted(DTYPE_BITS)),
    st.sampled_from(["f32", "FLOAT32", "F128", "Q4_0", "", "F32 ", "I128", "C64"]),
    _JSON_JUNK,
)
_DIM = st.one_of(st.integers(-2, 80), st.sampled_from([2**31, 2**32 + 1, 2**62, 2**64]))


@st.composite
def _byte_mutation(draw: st.DrawFn, blob: bytes) -> tuple[str, bytes]:
    """Edits that need no parseable header: truncation, the length prefix, flipped header bytes."""
    kind = draw(st.sampled_from(["truncate", "length", "flip"])) if len(blob) >= 8 else "truncate"
    if kind == "truncate":
        return kind, blob[: draw(st.integers(0, max(len(blob) - 1, 0)))]
    (length,) = struct.unpack("<Q", blob[:8])
    if kind == "length":
        claim = draw(
            st.one_of(
                st.integers(0, 2**64 - 1),
                st.integers(max(0, length - 16), length + 16),
                st.sampled_from([0, 1, 7, 8, 2**31, 8 << 30, 2**63, 2**64 - 1, len(blob)]),
            )
        )
        return kind, struct.pack("<Q", claim) + blob[8:]
    out = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(min(len(blob), 8 + length) - 1, 0)))
        out[i] = draw(st.integers(0, 255))
    return kind, bytes(out)


@st.composite
def _raw_mutation(draw: st.DrawFn, blob: bytes) -> tuple[str, bytes]:
    header, data = _raw_header(blob)
    names = sorted(k for k in header if k != "__metadata__")
    kind = draw(st.sampled_from(["bytes", "garbage", "duplicate", "offsets", "dtype", "shape", "entry"]))
    if kind == "bytes":
        return draw(_byte_mutation(blob))
    if kind == "garbage":
        text = draw(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode)))
        text = draw(st.sampled_from([text, b"{" + text, b"{" + text + b"}", b'{"a":' + text + b"}"]))
        return kind, struct.pack("<Q", len(text)) + text + data
    if not names:
        return kind, blob
    name = draw(st.sampled_from(names))
    entry = dict(header[name])
    if kind == "duplicate":
        raw = _header_bytes(header).rstrip(_JSON_SPACE)
        extra = json.dumps({name: entry})[1:-1].encode()
        text = raw[:-1] + b"," + extra + b"}"
        return kind, struct.pack("<Q", len(text)) + text + data
    if kind == "offsets":
        start, end = entry["data_offsets"]
        other = header[draw(st.sampled_from(names))]["data_offsets"]
        size = len(data)
        entry["data_offsets"] = draw(
            st.one_of(
                st.just(list(other)),  # overlaps another tensor exactly
                st.just([start + 1, end + 1]),  # shifted: overlap and out of range at the end
                st.tuples(st.integers(-2, size + 4), st.integers(-2, size + 4)).map(list),
                st.just([end, start]),
                st.just([start, 2**64 + end]),
                _JSON_JUNK,
            )
        )
    elif kind == "dtype":
        entry["dtype"] = draw(_DTYPES)
    elif kind == "shape":
        entry["shape"] = draw(st.one_of(st.lists(_DIM, max_size=5), _JSON_JUNK))
    else:
        entry = draw(
            st.one_of(
                _JSON_JUNK,
                st.fixed_dictionaries(
                    {}, optional={k: _JSON_JUNK for k in ("dtype", "shape", "data_offsets")}
                ),
            )
        )
    header[name] = entry
    return kind, _with_raw_header(header, data)


# ---- consistent mutations: a valid safetensors file with the wrong content ----

_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_SPECIALS = [float("nan"), float("inf"), float("-inf")]
_METADATA_KEYS = st.sampled_from(
    [
        "lora_adapter_metadata",
        "format",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_base_model_version",
        "modelspec.architecture",
        "lorarecipe.recipe",
        "x",
    ]
)
_METADATA_VALUES = st.one_of(
    st.text(max_size=30),
    _JSON_JUNK.map(json.dumps),
    st.sampled_from(
        [
            "{",
            "[]",
            "null",
            '{"r": -1, "lora_alpha": "x"}',
            '{"r": 0}',
            '{"unet": {"r": 4}}',
            '{"target_modules": 3}',
            '{"r": 4, "lora_alpha": 4, "use_dora": true}',
            "pt",
            "tf",
        ]
    ),
)


def _reshapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    total = math.prod(shape)
    out = [(total,), (1, total), (*shape, 1), tuple(reversed(shape))]
    out += [(d, total // d) for d in range(2, min(total, 64) + 1) if total % d == 0]
    return [s for s in out if s != shape]


@st.composite
def _consistent_mutation(draw: st.DrawFn, blob: bytes) -> tuple[str, bytes]:
    metadata, tensors = split(blob)
    kind = draw(
        st.sampled_from(
            ["reshape", "retype", "rank", "rename", "drop", "add", "values", "metadata", "empty", "scalar"]
        )
    )
    if kind == "empty" or not tensors:
        return "empty", join(draw(st.sampled_from([None, metadata, {}])), [])
    if kind == "metadata":
        extra = draw(st.dictionaries(_METADATA_KEYS, _METADATA_VALUES, min_size=1, max_size=3))
        return kind, join({**metadata, **extra}, tensors)
    i = draw(st.integers(0, len(tensors) - 1))
    t = tensors[i]
    if kind == "reshape":
        choices = _reshapes(t.shape)
        if choices:
            tensors[i] = Tensor(t.name, t.dtype, draw(st.sampled_from(choices)), t.data)
    elif kind == "retype":  # the same bytes read as another dtype, the shape adjusted to fit
        target = draw(
            st.sampled_from(["I32", "U32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "I64", "F8_E4M3"])
        )
        total_bits, bits = len(t.data) * 8, DTYPE_BITS[target]
        if t.shape and total_bits % bits == 0:
            count, rows = total_bits // bits, math.prod(t.shape[:-1])
            shape = (*t.shape[:-1], count // rows) if rows and count % rows == 0 else (count,)
            tensors[i] = Tensor(t.name, target, shape, t.data)
    elif kind == "rank":  # keep a prefix of the first dimension (or grow it with zeros)
        rows = draw(st.integers(0, max(t.shape[0] * 2, 1))) if t.shape else 1
        if t.shape:
            row = len(t.data) // max(t.shape[0], 1)
            data = (t.data + b"\0" * row * rows)[: row * rows]
            tensors[i] = Tensor(t.name, t.dtype, (rows, *t.shape[1:]), data)
    elif kind == "rename":
        name = draw(
            st.one_of(
                st.text(min_size=1, max_size=40),
                st.sampled_from(
                    [
                        t.name.replace("lora_A", "lora_B"),
                        t.name.replace("lora_down", "lora_up"),
                        t.name.replace("unet.", "text_encoder."),
                        t.name.replace("lora_unet_", "lora_te_"),
                        t.name + ".alpha",
                        t.name.replace(".weight", ".alpha"),
                        t.name.replace("down_blocks", "up_blocks"),
                        "lora_unet_" + t.name,
                        t.name.replace("_0_", "_9_").replace(".0.", ".9."),
                    ]
                ),
            )
        )
        if name and all(u.name != name for u in tensors):
            tensors[i] = Tensor(name, t.dtype, t.shape, t.data)
    elif kind == "drop":
        del tensors[i]
    elif kind == "add":
        dtype = draw(st.sampled_from(["F32", "F16", "I64", "BOOL"]))
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        nbytes = DTYPE_BITS[dtype] // 8 * math.prod(shape)
        name = draw(
            st.sampled_from([t.name.rsplit(".", 2)[0] + ".alpha", t.name + "_extra", "alpha", "__x__"])
        )
        if all(u.name != name for u in tensors):
            tensors.append(Tensor(name, dtype, shape, b"\0" * nbytes))
    elif kind == "values":
        if t.dtype in _FLOAT_BYTES and t.data:
            width = _FLOAT_BYTES[t.dtype]
            fmt = {8: "<d", 4: "<f", 2: "<e"}[width]
            value = draw(st.sampled_from([*_SPECIALS, 1e38, -0.0]))
            index = draw(st.integers(0, len(t.data) // width - 1))
            if t.dtype == "BF16":
                packed = struct.pack("<f", value)[2:]
            else:
                try:
                    packed = struct.pack(fmt, value)
                except OverflowError:
                    packed = struct.pack(fmt, float("inf"))
            data = t.data[: index * width] + packed + t.data[(index + 1) * width :]
            tensors[i] = Tensor(t.name, t.dtype, t.shape, data)
    elif kind == "scalar":
        tensors[i] = Tensor(t.name, t.dtype, (), t.data[: DTYPE_BITS[t.dtype] // 8])
    return kind, join(metadata, tensors)


def malformed_files(seeds: list[bytes]) -> st.SearchStrategy[Malformed]:
    """One to three raw or consistent mutations of a seed file."""

    @st.composite
    def strategy(draw: st.DrawFn) -> Malformed:
        blob = draw(st.sampled_from(seeds))
        done: list[str] = []
        for _ in range(draw(st.integers(1, 3))):
            try:
                split(blob)
            except Exception:  # an earlier raw mutation broke the layout: only byte edits apply now
                kind, blob = draw(_byte_mutation(blob))
            else:
                mutate = draw(st.sampled_from([_raw_mutation, _consistent_mutation]))
                kind, blob = draw(mutate(blob))
            done.append(kind)
        return Malformed("+".join(done), blob)

    return strategy()


# ---- the properties ----


def _assert_lorarecipe_error(exc: BaseException, what: str) -> None:
    if not isinstance(exc, LorarecipeError):
        raise AssertionError(f"{what} raised {type(exc).__name__}: {exc}") from exc
    assert exc.message and exc.problems and all(p.message for p in exc.problems)


def check_header_never_crashes(path: Path) -> str:
    """``read_header`` then ``inspect_lora``: a result or a lorarecipe error, nothing else."""
    try:
        info = inspect_lora(read_header(path))
    except Exception as exc:
        _assert_lorarecipe_error(exc, "read_header/inspect_lora")
        return "refused"
    return "unsupported" if info.unsupported or info.unrecognized_keys else "ok"


def check_load_never_crashes(pipe: Any, name: str, path: Path, cleanup: Callable[[Any, str], None]) -> str:
    """``load_adapter`` into a shared pipeline: loaded or a lorarecipe error, nothing else."""
    from lorarecipe.runner.pipeline.adapters import load_adapter

    try:
        load_adapter(pipe, name, path)
    except Exception as exc:
        _assert_lorarecipe_error(exc, "load_adapter")
        return "refused"
    finally:
        cleanup(pipe, name)
    return "loaded"
