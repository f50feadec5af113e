"""lorarecipe.inspect.safetensors_header: validation of untrusted safetensors headers.

The oracle for the property tests is safetensors' own Rust parser (``safetensors.deserialize``):
whatever we accept, it must accept with the same names, dtypes and shapes; whatever it accepts we
accept too, except for the few cases where we are deliberately stricter (listed in STRICTER).
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorarecipe.errors import InputUnavailableError, LorarecipeError, UnsafeInputError
from lorarecipe.inspect import safetensors_header as sh
from lorarecipe.inspect.safetensors_header import (
    DTYPE_BITS,
    SafetensorsHeader,
    parse_header_bytes,
    read_header,
)

REPO = Path(__file__).resolve().parents[1]
STRICTER = ("dimensions (limit", "twice")  # we refuse these; safetensors would not


def raw(text: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(text)) + text + data


def build(header: dict[str, Any], data: bytes = b"", pad: int = 0) -> bytes:
    raw = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + data


def write(path: Path, header: dict[str, Any], data: bytes = b"", pad: int = 0) -> Path:
    path.write_bytes(build(header, data, pad))
    return path


def valid_file(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "ok.safetensors"
    save_file(
        {"w": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16), "s": torch.tensor(1.5)},
        str(path),
        metadata={"format": "pt", "note": "é"},
    )
    return path


def test_reads_a_file_written_by_safetensors(tmp_path: Path) -> None:
    path = valid_file(tmp_path)
    header = read_header(path)
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    expected = json.loads(blob[8 : 8 + size])
    assert header.header_size == size and header.data_offset == 8 + size
    assert header.file_size == len(blob)
    assert dict(header.metadata) == {"format": "pt", "note": "é"}
    for name, info in header.tensors.items():
        assert (info.dtype, list(info.shape), [info.start, info.end]) == (
            expected[name]["dtype"],
            expected[name]["shape"],
            expected[name]["data_offsets"],
        )
    assert header.tensors["w"].nbytes == 24 and header.tensors["s"].shape == ()
    assert header.total_tensor_bytes == 24 + 8 + 4 == len(blob) - header.data_offset
    assert header.largest_tensor_bytes == 24


def test_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path / "big.safetensors",
        {"a": {"dtype": "U8", "shape": [4 << 20], "data_offsets": [0, 4 << 20]}},
        b"\0" * (4 << 20),
    )
    read: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def fileno(self) -> int:
            return int(self.handle.fileno())

        def read(self, n: int = -1) -> bytes:
            assert n >= 0, "never read to EOF"
            chunk = bytes(self.handle.read(n))
            read.append(len(chunk))
            return chunk

    monkeypatch.setattr(sh, "open", lambda p, mode="r": Counting(real_open(p, mode)), raising=False)
    header = read_header(path)
    assert sum(read) == header.data_offset
    assert "mmap" not in sh.__dict__


def test_every_safetensors_dtype_is_accepted_with_its_size() -> None:
    for dtype, bits in DTYPE_BITS.items():
        nbytes = bits * 8 // 8  # 8 elements: whole bytes for the 4- and 6-bit types too
        data = build({"t": {"dtype": dtype, "shape": [2, 4], "data_offsets": [0, nbytes]}}, b"\0" * nbytes)
        assert parse_header_bytes(data, len(data)).tensors["t"].nbytes == nbytes
        assert _theirs(data) == [("t", dtype, (2, 4))]  # and safetensors agrees on the size
    assert len(DTYPE_BITS) == 22  # safetensors 0.8's Dtype enum


def test_sub_byte_tensors_must_fill_whole_bytes() -> None:
    data = build({"t": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(UnsafeInputError, match="do not fill whole bytes"):
        parse_header_bytes(data, len(data))


def test_padded_header_and_header_length_starting_with_0x80_are_not_pickle(tmp_path: Path) -> None:
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    body = json.dumps(header).encode()
    path = write(tmp_path / "x.safetensors", header, b"\0", pad=0x0280 - len(body))  # length bytes 80 02 ..
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert list(read_header(path).tensors) == ["a"]


BAD_HEADERS: list[tuple[str, bytes, str]] = [
    ("short", b"\x01\x00", "too short"),
    ("zero length", struct.pack("<Q", 0) + b"{}", "header length is 0"),
    ("past eof", struct.pack("<Q", 50) + b"{}", "larger than the file"),
    ("not utf8", raw(b"{\xff}"), "not UTF-8"),
    ("not json", raw(b"{x}"), "not valid JSON"),
    ("not object", raw(b"[]"), "not a JSON object"),
    ("NaN", raw(b'{"a":{"dtype":"U8","shape":[NaN],"data_offsets":[0,1]}}', b"\0"), "NaN is not allowed"),
    ("metadata list", build({"__metadata__": []}), "__metadata__ is not a JSON object"),
    ("metadata int", build({"__metadata__": {"a": 1}}), "not a string"),
    ("no dtype", build({"a": {"shape": [1], "data_offsets": [0, 1]}}, b"\0"), "missing 'dtype'"),
    ("entry list", build({"a": [1]}), "not a JSON object"),
    (
        "bad dtype",
        build({"a": {"dtype": "u8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
        "unknown dtype",
    ),
    (
        "shape str",
        build({"a": {"dtype": "U8", "shape": "1", "data_offsets": [0, 1]}}, b"\0"),
        "list of integers",
    ),
    ("shape bool", build({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"\0"), "integers"),
    ("negative dim", build({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"\0"), "negative"),
    (
        "huge dims",
        build({"a": {"dtype": "F64", "shape": [2**62, 2**62, 2**62], "data_offsets": [0, 1]}}, b"\0"),
        "absurdly large",
    ),
    (
        "many dims",
        build({"a": {"dtype": "U8", "shape": [1] * 17, "data_offsets": [0, 1]}}, b"\0"),
        "limit 16",
    ),
    (
        "offsets 3",
        build({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, b"\0"),
        "[start, end]",
    ),
    (
        "offsets reversed",
        build({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 0]}}, b"\0"),
        "start <= end",
    ),
    (
        "beyond data",
        build({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"\0"),
        "beyond the 1-byte",
    ),
    (
        "size mismatch",
        build({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
        "needs 8",
    ),
    (
        "overlap",
        build(
            {
                "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
            },
            b"\0" * 3,
        ),
        "overlaps",
    ),
    (
        "hole",
        build({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"\0" * 2),
        "belong to no tensor",
    ),
    (
        "trailing",
        build({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0" * 3),
        "2 trailing bytes",
    ),
    ("surrogate", raw(b'{"__metadata__":{"k":"\\ud800"}}'), "lone surrogate"),
]


@pytest.mark.parametrize(
    ("data", "needle"), [(d, n) for _, d, n in BAD_HEADERS], ids=[i for i, _, _ in BAD_HEADERS]
)
def test_malformed_headers_are_refused_with_a_clear_message(tmp_path: Path, data: bytes, needle: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(UnsafeInputError) as caught:
        read_header(path)
    assert needle in str(caught.value)
    assert str(path) in str(caught.value)


def test_duplicate_keys_are_refused() -> None:
    data = raw(
        b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
        b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        b"\0",
    )
    with pytest.raises(UnsafeInputError, match="key 'a' twice"):
        parse_header_bytes(data, len(data))


def test_header_limit_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "x.safetensors", {"__metadata__": {"k": "v" * 100}})
    with pytest.raises(UnsafeInputError, match="exceeds the limit of 64 bytes"):
        read_header(path, max_header_bytes=64)


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth", ".pkl", ".PICKLE"])
def test_pickle_suffixes_are_refused_without_reading(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"  # does not even exist: refused by name
    with pytest.raises(UnsafeInputError, match=r"never loads pickle files: convert it to \.safetensors"):
        read_header(path)


def test_pickle_and_torch_zip_content_is_refused_whatever_the_name(tmp_path: Path) -> None:
    import torch

    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(pickle.dumps({"w": [1.0] * 10}, protocol=4))
    zipped = tmp_path / "zipped.safetensors"
    torch.save({"w": torch.zeros(3)}, str(zipped))
    legacy = tmp_path / "legacy.safetensors"
    torch.save({"w": torch.zeros(3)}, str(legacy), _use_new_zipfile_serialization=False)
    for path in (plain, zipped, legacy):
        with pytest.raises(UnsafeInputError, match="is a pickle/PyTorch checkpoint"):
            read_header(path)


def test_missing_file_directory_and_special_files(tmp_path: Path) -> None:
    with pytest.raises(InputUnavailableError, match="file not found"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(UnsafeInputError, match="is a directory"):
        read_header(tmp_path)
    if sys.platform != "win32":
        import os

        fifo = tmp_path / "fifo.safetensors"
        os.mkfifo(fifo)
        with pytest.raises(UnsafeInputError, match="not a regular file"):
            read_header(fifo)  # must not block


def test_real_lora_files_all_parse(realdata: Path) -> None:
    files = sorted((realdata / "loras").glob("*/*.safetensors"))
    assert len(files) == 16
    for path in files:
        header = read_header(path)
        assert header.data_offset + header.total_tensor_bytes == header.file_size


def test_inspect_never_imports_heavy_libraries(tmp_path: Path) -> None:
    folder = tmp_path / "base"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 768}))
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    write(
        folder / "unet" / "diffusion_pytorch_model.safetensors",
        {key: {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]}},
        b"\0" * 12,
    )
    code = (
        "import sys, glob\n"
        "from lorarecipe.inspect import read_header, inspect_lora, check_lora_against_base\n"
        "from lorarecipe.inspect import inspect_diffusers_folder, inspect_single_file\n"
        "base = inspect_diffusers_folder(sys.argv[2])\n"
        "inspect_single_file(sys.argv[2] + '/unet/diffusion_pytorch_model.safetensors')\n"
        "for f in glob.glob(sys.argv[1] + '/*/*.safetensors'):\n"
        "    check_lora_against_base(inspect_lora(read_header(f)), base)\n"
        "heavy = {'torch', 'numpy', 'safetensors', 'diffusers', 'peft', 'transformers', 'mmap'}\n"
        "print(base.family, sorted(heavy & set(sys.modules)))\n"
    )
    loras = REPO.parent / "shared" / "realdata" / "loras"
    out = subprocess.run(
        [sys.executable, "-c", code, str(loras), str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "sd1 []"


# ---- property tests: never anything but a lorarecipe error; agree with safetensors' own parser ----


def _ours(data: bytes) -> SafetensorsHeader | LorarecipeError:
    try:
        return parse_header_bytes(data, len(data))
    except LorarecipeError as exc:  # anything else propagates and fails the test
        return exc


def _theirs(data: bytes) -> list[tuple[str, str, tuple[int, ...]]] | None:
    from safetensors import deserialize

    try:
        return sorted((name, v["dtype"], tuple(v["shape"])) for name, v in deserialize(data))
    except Exception:
        return None


def _agree(data: bytes) -> None:
    ours, theirs = _ours(data), _theirs(data)
    if isinstance(ours, SafetensorsHeader):
        assert theirs is not None, "we accepted a file safetensors refuses"
        assert sorted((t.name, t.dtype, t.shape) for t in ours.tensors.values()) == theirs
    elif theirs is not None:
        assert any(s in ours.message for s in STRICTER), f"we refused a valid file: {ours.message}"


def _valid_bytes(spec: list[tuple[str, list[int]]], metadata: dict[str, str]) -> bytes:
    """A well-formed file laid out like safetensors writes it (contiguous data, space-padded header)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for i, (dtype, shape) in enumerate(spec):
        size = DTYPE_BITS[dtype] * _prod(shape) // 8
        header[f"t{i}.{dtype}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    blob = raw(text + b" " * (-len(text) % 8), b"\x01" * offset)
    assert _theirs(blob) is not None
    return blob


def _prod(shape: list[int]) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out


_specs = st.lists(
    st.tuples(
        st.sampled_from(["F32", "F16", "BF16", "U8", "I64", "BOOL"]), st.lists(st.integers(0, 4), max_size=3)
    ),
    min_size=0,
    max_size=4,
)
_meta = st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)
_fast = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@_fast
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_lorarecipe_errors(data: bytes) -> None:
    _agree(data)
    _agree(struct.pack("<Q", len(data)) + data)  # a plausible length in front of garbage


@_fast
@given(_specs, _meta, st.data())
def test_mutated_valid_files_agree_with_safetensors(
    spec: list[tuple[str, list[int]]], metadata: dict[str, str], data: st.DataObject
) -> None:
    blob = _valid_bytes(spec, metadata)
    assert isinstance(_ours(blob), SafetensorsHeader)
    mutation = data.draw(st.sampled_from(["flip", "truncate", "insert", "length"]))
    position = data.draw(st.integers(0, len(blob) - 1))
    if mutation == "flip":
        blob = blob[:position] + bytes([data.draw(st.integers(0, 255))]) + blob[position + 1 :]
    elif mutation == "truncate":
        blob = blob[:position]
    elif mutation == "insert":
        blob = blob[:position] + data.draw(st.binary(min_size=1, max_size=4)) + blob[position:]
    else:
        blob = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + blob[8:]
    _agree(blob)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**65) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "U8", "F4", "F6_E3M2", "x", 3]) | _json_values,
        "shape": st.lists(st.integers(-1, 5), max_size=3) | _json_values,
        "data_offsets": st.lists(st.integers(-1, 40), min_size=2, max_size=2) | _json_values,
    },
)


@_fast
@given(
    st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]), _entries | _json_values, max_size=3),
    st.integers(0, 40),
)
def test_structured_header_garbage_agrees_with_safetensors(header: dict[str, Any], data_size: int) -> None:
    _agree(build(header, b"\0" * data_size))
