"""One output tensor's bytes: base rows read positionally, fused in float32 (``fuse_math``), rounded once.

OutTensor + its fuse targets -> bytes in the output dtype and stored form. A whole tensor is fused with
:func:`~lorarecipe.runner.fuse_math.fused_weight` (peak: about four float32 copies of the tensor). A
tensor whose output is not float32 (a dtype conversion, or a fuse rounded to float16 or bfloat16) and
that is larger than one chunk goes through in row chunks of about 4 MiB of float32 instead: read,
fused (the same function on the chunk's rows) and written a chunk at a time, in 64-row blocks, which
sum exactly as one big GEMM does (a test checks). Peak: a few chunks. NaN/Inf in a fused weight is
refused, as PEFT's safe merge refuses it; an overflow of the output dtype too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...errors import BuildError, StreamingUnsupported
from ...outputs.singlefile import apply_transform
from ...outputs.singlefile_names import StoredForm
from ..fuse_math import FuseTarget, fused_weight, rows_capable
from .positional_io import PositionalReader, SafetensorsWriter, WriteBehind
from .sources import SAME_BYTES_FORMS, OutTensor, Part

__all__ = ["WriteStats", "as_bytes", "chunk_rows", "compute", "write_chunked"]

_CHUNK_ELEMENTS = 1024 * 1024  # elements per row chunk: 4 MiB of float32 per temporary


@dataclass
class WriteStats:
    """Counts over all files written, and the targets consumed (each must be used exactly once)."""

    tensors: int = 0
    changed: int = 0
    max_abs_diff_vs_fp32: float = 0.0
    used: set[tuple[str, str]] = field(default_factory=set)


def torch_dtype_of(name: str) -> Any:
    """safetensors dtype name -> torch dtype."""
    import torch

    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    if name not in table:
        raise StreamingUnsupported(f"the streaming fuser cannot convert tensors of dtype {name}")
    return table[name]


class Scratch:
    """Reusable buffers for the tensor being computed, one per slot, grown to the largest request.

    A fresh multi-MB allocation is page-faulted in by the kernel page by page, which costs more than
    the arithmetic on it (measured here: converting a 13 M-element float16 weight to float32 takes
    26-46 ms into a new tensor, 4 ms into a reused one). Only for temporaries that die before the
    next request of the same slot: never for bytes handed to the write-behind thread.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Any] = {}

    def __call__(self, slot: str, shape: tuple[int, ...], dtype: Any = None) -> Any:
        import torch

        dtype = dtype or torch.float32
        count = math.prod(shape)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[slot] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buffer[:nbytes].view(dtype).view(shape)

    def view(self, slot: str, nbytes: int) -> memoryview:
        """A writable byte view of ``nbytes`` (for a positional read)."""
        return memoryview(self(slot, (nbytes,), _uint8()).numpy())


def _uint8() -> Any:
    import torch

    return torch.uint8


def _load_part(reader: PositionalReader, part: Part, scratch: Scratch | None = None) -> Any:
    """A part's stored bytes -> a tensor in its diffusers shape (stored dtype, no copy beyond the read;
    read into ``scratch`` when given: then only valid until the next read)."""
    import torch

    dtype = torch_dtype_of(part.tensor.dtype)
    offset, length = part.byte_range
    if length == 0:
        tensor = torch.empty(part.stored_shape, dtype=dtype)
    elif scratch is not None:
        view = scratch.view("read", length)
        reader.read_into(part.path, offset, view)
        tensor = torch.frombuffer(view, dtype=dtype).reshape(part.stored_shape)
    else:
        tensor = torch.frombuffer(reader.read(part.path, offset, length), dtype=dtype).reshape(
            part.stored_shape
        )
    if part.stored is StoredForm.CONV1X1:
        return tensor.reshape(tensor.shape[:-2])
    if part.stored is StoredForm.TRANSPOSE:
        return tensor.t()
    if part.stored is StoredForm.SWAP_HALVES:
        return apply_transform(tensor, StoredForm.SWAP_HALVES)  # its own inverse
    return tensor


def _check_rounding(
    fused: Any, rounded: Any, target: FuseTarget, stats: WriteStats, scratch: Scratch
) -> None:
    """Refuse NaN/Inf (PEFT's safe merge does) and overflow of the output dtype, and record the
    rounding error. One ``aminmax`` over the rounded tensor finds both (NaN propagates, an overflow is
    Inf; much faster than ``isfinite().all()``); below float32 the rounding error is measured in a
    reused buffer (``rounded - fused``, no fresh allocation).
    """
    import torch

    if not fused.numel():
        return
    low, high = torch.aminmax(rounded)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        name = f"{target.component}.{target.module_name}"
        nan = bool(rounded.isnan().any())
        if rounded.dtype != torch.float32 and not nan and bool(torch.isfinite(fused).all()):
            raise BuildError(_overflow_message(f"fused weight {name}", rounded.dtype))
        raise BuildError(f"fused weight {name} contains NaN/Inf")
    if rounded.dtype != torch.float32:
        diff = scratch("diff", tuple(rounded.shape))
        diff.copy_(rounded)
        low, high = torch.aminmax(diff.sub_(fused))
        stats.max_abs_diff_vs_fp32 = max(stats.max_abs_diff_vs_fp32, -float(low), float(high))


def _overflow_message(what: str, dtype: Any) -> str:
    import torch

    largest = torch.finfo(dtype).max
    return (
        f"{what} overflows {str(dtype).removeprefix('torch.')}: values beyond ±{largest:.6g} would become "
        "Inf; save this output in a wider dtype (dtype: float32 or bfloat16) or lower the weights"
    )


def convert(base: Any, out_dtype: Any, name: str) -> Any:
    """An untouched tensor in the output dtype; refused when narrowing it overflows (finite -> Inf)."""
    import torch

    out = base.to(out_dtype)
    narrower = out.is_floating_point() and torch.finfo(out.dtype).max < torch.finfo(base.dtype).max
    if narrower and out.numel():
        low, high = torch.aminmax(out)
        if math.isinf(float(low)) or math.isinf(float(high)):
            low, high = torch.aminmax(base)
            if math.isfinite(float(low)) and math.isfinite(float(high)):
                raise BuildError(_overflow_message(f"weight {name}", out_dtype))
    return out


def compute(
    reader: PositionalReader,
    tensor: OutTensor,
    targets: Mapping[tuple[str, str], FuseTarget],
    stats: WriteStats,
    scratch: Scratch,
    peft_order: bool = True,
) -> Any:
    """One output tensor, whole: its parts read, fused where a target applies, converted, joined.
    ``peft_order``: see ``fuse_math.fused_weight``."""
    import torch

    out_dtype = torch_dtype_of(tensor.dtype)
    pieces = []
    for part in tensor.parts:
        target = targets.get((part.component, part.key))
        if target is None:
            base = _load_part(reader, part)  # not into the scratch: it may become the output as is
            pieces.append(convert(base, out_dtype, f"{part.component}.{part.key}"))
            continue
        base = _load_part(reader, part, scratch)
        stats.used.add((part.component, part.key))
        if out_dtype == torch.float32:  # the fused weight is the output: a tensor of its own
            out = torch.empty(tuple(base.shape))
            fused = fused_weight(base, target, scratch=scratch, out=out, peft_order=peft_order)
        else:
            fused = fused_weight(base, target, scratch=scratch, peft_order=peft_order)
        rounded = fused.to(out_dtype)
        _check_rounding(fused, rounded, target, stats, scratch)
        if not torch.equal(rounded, base.to(out_dtype)):
            stats.changed += 1
        pieces.append(rounded)
        del fused, base
    joined = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
    result = apply_transform(joined, tensor.transform).contiguous()
    if tuple(result.shape) != tensor.shape:
        raise BuildError(f"{tensor.key}: computed shape {list(result.shape)}, planned {list(tensor.shape)}")
    return result


def as_bytes(tensor: Any) -> memoryview:
    import torch

    flat = tensor.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def chunk_rows(row_elements: int) -> int:
    """Rows per chunk: about ``_CHUNK_ELEMENTS`` elements, a multiple of 64 rows when that many fit
    (whole GEMM row blocks, so each delta row is summed exactly as in one big GEMM)."""
    step = max(1, _CHUNK_ELEMENTS // max(row_elements, 1))
    return step - step % 64 if step >= 64 else step


def write_chunked(
    reader: PositionalReader,
    writer: SafetensorsWriter,
    tensor: OutTensor,
    targets: Mapping[tuple[str, str], FuseTarget],
    stats: WriteStats,
    behind: WriteBehind,
    scratch: Scratch,
    peft_order: bool = True,
) -> bool:
    """Write ``tensor`` in row chunks; False (nothing written) when it must go through ``compute``.

    A tensor made of several parts stacked along dim 0 (a BFL single file's fused qkv or linear1)
    is written part after part, each at its rows' offset in the output tensor."""
    if tensor.dtype == "F32" or tensor.transform not in SAME_BYTES_FORMS:
        return False
    parts = tensor.parts
    if any(p.stored not in SAME_BYTES_FORMS or not p.stored_shape or not p.stored_shape[0] for p in parts):
        return False
    if not all(rows_capable(targets.get((p.component, p.key))) for p in parts):
        return False
    if math.prod(tensor.shape) <= _CHUNK_ELEMENTS:
        return False  # small: the whole-tensor path is as cheap
    out_row = tensor.entry.nbytes // tensor.shape[0]
    first_row = 0
    for part in parts:
        at = first_row * out_row
        _write_part_chunks(
            reader, writer, tensor.key, part, targets, stats, behind, scratch, at, tensor.dtype, peft_order
        )
        first_row += part.stored_shape[0]
    return True


def _write_part_chunks(
    reader: PositionalReader,
    writer: SafetensorsWriter,
    key: str,
    part: Part,
    targets: Mapping[tuple[str, str], FuseTarget],
    stats: WriteStats,
    behind: WriteBehind,
    scratch: Scratch,
    out_offset: int,
    out_dtype_name: str,
    peft_order: bool,
) -> None:
    """One part's rows, read, fused (when a target has it) and written a chunk at a time from
    ``out_offset`` bytes into the output tensor ``key``."""
    import torch

    target = targets.get((part.component, part.key))
    shape = part.stored_shape
    row_elements = math.prod(shape[1:])
    stored, out_dtype = torch_dtype_of(part.tensor.dtype), torch_dtype_of(out_dtype_name)
    diffusers_shape = shape[:-2] if part.stored is StoredForm.CONV1X1 else shape
    offset, length = part.byte_range
    stored_row = length // shape[0]
    out_row = torch.empty((), dtype=out_dtype).element_size() * row_elements
    step = chunk_rows(row_elements)
    changed = False
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        rows = (stop - start, *diffusers_shape[1:])
        where = (offset + start * stored_row, (stop - start) * stored_row)
        if target is None:  # a dtype conversion: the converted rows are written as they are
            base = torch.frombuffer(reader.read(part.path, *where), dtype=stored).reshape(rows)
            out = convert(base, out_dtype, f"{part.component}.{part.key}")
        else:
            view = scratch.view("read", where[1])
            reader.read_into(part.path, where[0], view)
            base = torch.frombuffer(view, dtype=stored).reshape(rows)
            fused = fused_weight(base, target, (start, stop), scratch, peft_order=peft_order)
            out = fused.to(out_dtype)
            _check_rounding(fused, out, target, stats, scratch)
            changed = changed or not torch.equal(out, base.to(out_dtype))
            del fused
        data_out = as_bytes(out)
        behind.submit(
            functools.partial(writer.write_part, key, out_offset + start * out_row, data_out), data_out.nbytes
        )
        del out, base, data_out
    if target is not None:
        stats.used.add((part.component, part.key))
        stats.changed += int(changed)
