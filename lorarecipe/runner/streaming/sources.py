"""Where every output tensor's bytes come from: base files + key plans -> output files, torch-free.

Input: a base (diffusers folder, or one LDM/SGM single file read through the single-file layout of
:mod:`lorarecipe.singlefile`) and an output layout. Output: ``OutFile``s whose ``OutTensor``s name
their ``Part``s — a stored tensor (or some of its rows) in a base file, with the stored-form
transform to undo — keyed by the (component, state-dict key) a fuse target is looked up by. Headers
only: no tensor bytes are read here, so the whole output header is known before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import BuildError, StreamingUnsupported
from ...families import FAMILIES as FAMILY_REGISTRY
from ...fs.json_files import read_json
from ...inspect import SafetensorsHeader, TensorInfo, read_header
from ...inspect.base_model import check_model_index, weight_files
from ...outputs.singlefile import FAMILIES as SINGLE_FILE_FAMILIES
from ...outputs.singlefile import single_file_layout
from ...outputs.singlefile_names import StoredForm
from .positional_io import OutputEntry

#: stored dtype, component, state-dict key -> the dtype an output tensor is written in
DTypeRule = Callable[[str, str, str], str]

__all__ = [
    "FLOAT_DTYPES",
    "SAME_BYTES_FORMS",
    "FolderBase",
    "OutFile",
    "OutTensor",
    "Part",
    "config_components",
    "folder_parts",
    "folder_to_folder",
    "read_folder_base",
    "resolve_key",
    "shard_index",
    "single_file_parts",
    "to_folder",
    "to_single_file",
]

FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
#: Stored forms whose bytes equal the diffusers tensor's (they differ by shape only).
SAME_BYTES_FORMS = (None, StoredForm.CONV1X1)
_NOT_COPIED = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle", ".msgpack", ".h5", ".onnx")
_PICKLE = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
_FILE_NAME = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}


@dataclass(frozen=True)
class Part:
    """A diffusers-shaped tensor ``(component, key)`` stored in ``path``: the rows ``rows`` (dim 0) of
    ``tensor``, in the single-file layout's stored form ``stored`` (None: as diffusers holds it)."""

    component: str
    key: str
    path: Path
    tensor: TensorInfo
    data_offset: int
    rows: tuple[int, int] | None = None
    stored: StoredForm | None = None

    @property
    def stored_shape(self) -> tuple[int, ...]:
        shape = self.tensor.shape
        return shape if self.rows is None else (self.rows[1] - self.rows[0], *shape[1:])

    @property
    def byte_range(self) -> tuple[int, int]:
        """(absolute file offset, length) of the bytes that hold this part."""
        start = self.data_offset + self.tensor.start
        if self.rows is None:
            return start, self.tensor.nbytes
        row = self.tensor.nbytes // max(self.tensor.shape[0], 1)
        return start + self.rows[0] * row, (self.rows[1] - self.rows[0]) * row


@dataclass(frozen=True)
class OutTensor:
    """An output tensor: its parts concatenated along dim 0, then ``transform`` (single-file form)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]
    transform: StoredForm | None = None

    @property
    def entry(self) -> OutputEntry:
        return OutputEntry(self.key, self.dtype, self.shape)


@dataclass(frozen=True)
class OutFile:
    rel: str  # path inside the output folder ('' for a single-file output)
    tensors: tuple[OutTensor, ...]


@dataclass
class FolderBase:
    """A diffusers folder: its weight files per component (headers read) and the files to copy."""

    root: Path
    index: dict[str, Any]
    files: dict[str, list[tuple[Path, str, SafetensorsHeader]]] = field(default_factory=dict)
    shard_indexes: dict[str, tuple[Path, str]] = field(default_factory=dict)
    copies: list[tuple[Path, str]] = field(default_factory=list)

    def keys(self, component: str) -> dict[str, tuple[Path, SafetensorsHeader]]:
        return {k: (path, h) for path, _, h in self.files.get(component, []) for k in h.tensors}


def read_folder_base(root: Path, variant: str | None) -> FolderBase:
    """Headers of every component's weight files, and the non-weight files to copy as they are."""
    index = check_model_index(root)
    base = FolderBase(root, index, copies=[(root / "model_index.json", "model_index.json")])

    def drop(name: str) -> str:  # the pipeline route saves variant weights under the default names
        return name.replace(f".{variant}", "") if variant else name

    for component, entry in sorted(index.items()):
        if component.startswith("_") or not (isinstance(entry, list) and entry[0] is not None):
            continue
        folder = root / component
        if not folder.is_dir():
            continue
        files, shard_index = weight_files(folder, variant)
        if not files and any(f.suffix in _PICKLE for f in folder.iterdir()):
            raise BuildError(
                f"{folder}: only pickle weights; lorarecipe never loads pickle files (convert them to "
                ".safetensors)"
            )
        base.files[component] = [(p, f"{component}/{drop(p.name)}", read_header(p)) for p in files]
        if shard_index is not None:
            base.shard_indexes[component] = (shard_index, f"{component}/{drop(shard_index.name)}")
        for file in sorted(folder.rglob("*")):
            rel = file.relative_to(root)
            hidden = any(part.startswith(".") for part in rel.parts)
            weights = file.name.endswith(_NOT_COPIED) or ".safetensors.index" in file.name
            if file.is_file() and not hidden and not weights:
                base.copies.append((file, rel.as_posix()))
    return base


def folder_to_folder(base: FolderBase, dtype: DTypeRule) -> list[OutFile]:
    """Diffusers folder -> diffusers folder: every weight file rewritten with the same keys, in data order."""
    out = []
    for component, files in base.files.items():
        for path, rel, header in files:
            tensors = []
            for info in sorted(header.tensors.values(), key=lambda t: (t.start, t.name)):
                part = Part(component, info.name, path, info, header.data_offset)
                out_dtype = dtype(info.dtype, component, info.name)
                tensors.append(OutTensor(info.name, out_dtype, info.shape, (part,)))
            out.append(OutFile(rel, tuple(tensors)))
    return out


def resolve_key(keys: Mapping[str, Any], key: str) -> str | None:
    """A state-dict key -> the key a file stores it under (text encoders: with or without ``text_model.``)."""
    for candidate in (key, f"text_model.{key}", key.removeprefix("text_model.")):
        if candidate in keys:
            return candidate
    return None


def folder_parts(
    base: FolderBase, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]
) -> dict[tuple[str, str], Part]:
    """(component, state-dict key) -> its Part in a diffusers folder, for every key of ``shapes``."""
    parts: dict[tuple[str, str], Part] = {}
    missing: list[str] = []
    for component, keys in shapes.items():
        stored = base.keys(component)
        for key, shape in keys.items():
            found = resolve_key(stored, key)
            if found is None:
                if key.endswith("position_ids"):
                    continue  # a derived buffer some files omit; transformers rebuilds it
                missing.append(f"{component}.{key}")
                continue
            path, header = stored[found]
            info = header.tensors[found]
            if info.shape != tuple(shape):
                raise BuildError(
                    f"{path}: {found} has shape {list(info.shape)}, the model expects {list(shape)}"
                )
            parts[(component, key)] = Part(component, key, path, info, header.data_offset)
    if missing:
        raise BuildError(f"{len(missing)} weights are missing from the base folder: {', '.join(missing[:5])}")
    return parts


def single_file_parts(
    path: Path,
    family: str,
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
    configs: Mapping[str, Mapping[str, Any]],
) -> dict[tuple[str, str], Part]:
    """(component, state-dict key) -> its Part in an LDM/SGM single file, via the single-file layout."""
    header = read_header(path)
    try:
        layout = single_file_layout(family, _layout_components(family, shapes), configs)
    except ValueError as exc:
        raise StreamingUnsupported(f"single-file base: {exc}") from None
    parts: dict[tuple[str, str], Part] = {}
    problems: list[str] = []
    for tensor in layout:
        info = header.tensors.get(tensor.key)
        if info is None and tensor.key.endswith("position_ids"):
            continue  # a derived buffer (transformers rebuilds it); not every file stores it
        if info is None or (tensor.shape is not None and info.shape != tuple(tensor.shape)):
            problems.append(tensor.key if info is None else f"{tensor.key} (shape {list(info.shape)})")
            continue
        for piece in tensor.sources:
            parts[(piece.component, piece.key)] = Part(
                piece.component, piece.key, path, info, header.data_offset, piece.rows, tensor.transform
            )
    if problems:
        raise StreamingUnsupported(
            f"{path.name}: {len(problems)} tensors of the single-file layout are missing or shaped "
            f"differently ({', '.join(problems[:5])}); the streaming fuser cannot read this file "
            "(use --executor diffusers)"
        )
    return parts


def _layout_components(
    family: str, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]
) -> dict[str, Mapping[str, tuple[int, ...]]]:
    table = SINGLE_FILE_FAMILIES.get(family)
    if table is None:
        raise StreamingUnsupported(f"family {family!r} has no single-file layout")
    return {c: s for c, s in shapes.items() if c in table}


def _diffusers_shape(part: Part) -> tuple[int, ...]:
    shape = part.stored_shape
    if part.stored is StoredForm.CONV1X1:
        return shape[:-2]
    if part.stored is StoredForm.TRANSPOSE:
        return shape[::-1]
    return shape


def to_single_file(
    family: str,
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
    configs: Mapping[str, Mapping[str, Any]],
    parts: Mapping[tuple[str, str], Part],
    dtype: DTypeRule,
    expert: str | None = None,
) -> OutFile:
    """The single-file output: its layout over the model's state-dict keys, each piece read from ``parts``.

    ``expert``: a family with two experts writes one of them (Wan 2.2 A14B's ``transformer_2`` in the
    layout of its ``transformer``)."""
    denoiser = FAMILY_REGISTRY[family].denoiser if family in FAMILY_REGISTRY else ""
    source = expert if expert and expert != denoiser else denoiser
    if source != denoiser:
        shapes = {
            denoiser: shapes[source],
            **{c: v for c, v in shapes.items() if c not in (denoiser, source)},
        }
        configs = {**configs, denoiser: configs.get(source, {})}
    components = _layout_components(family, shapes)
    try:
        layout = single_file_layout(family, components, configs)
    except ValueError as exc:
        raise BuildError(f"single-file output: {exc}") from None
    tensors = []
    for tensor in layout:
        keys = [(source if p.component == denoiser else p.component, p.key) for p in tensor.sources]
        pieces = tuple(parts[key] for key in keys if key in parts)
        if len(pieces) != len(tensor.sources):
            continue  # a derived buffer (position_ids) the base does not store
        stored = pieces[0].tensor.dtype
        if any(p.tensor.dtype != stored for p in pieces):
            raise BuildError(f"single-file output: the parts of {tensor.key} have different dtypes")
        shape = tuple(tensor.shape) if tensor.shape is not None else _diffusers_shape(pieces[0])
        written = dtype(stored, pieces[0].component, pieces[0].key)
        tensors.append(OutTensor(tensor.key, written, shape, pieces, tensor.transform))
    return OutFile("", tuple(tensors))


def to_folder(
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
    libraries: Mapping[str, str],
    parts: Mapping[tuple[str, str], Part],
    dtype: DTypeRule,
) -> list[OutFile]:
    """A diffusers folder from a single-file base: one weight file per component the file holds,
    state-dict keys sorted (the others come from the config folder: :func:`config_components`)."""
    out = []
    for component, keys in shapes.items():
        tensors = []
        for key in sorted(keys):
            part = parts.get((component, key))
            if part is None:
                continue
            written = dtype(part.tensor.dtype, component, key)
            tensors.append(OutTensor(key, written, _diffusers_shape(part), (part,)))
        if tensors:
            out.append(OutFile(f"{component}/{_FILE_NAME[libraries[component]]}", tuple(tensors)))
    return out


def config_components(config: FolderBase, held: set[str]) -> FolderBase:
    """The config folder of a single-file base, without the components the single file holds: the
    models the pipeline route loads from it (FLUX.1's, FLUX.2's, SD 3's, Qwen-Image's, Z-Image's and
    Wan's files hold one transformer), copied (or fused) into a folder output."""
    return FolderBase(
        config.root,
        config.index,
        {c: files for c, files in config.files.items() if c not in held},
        {c: index for c, index in config.shard_indexes.items() if c not in held},
        config.copies,
    )


def shard_index(base: FolderBase, component: str, files: list[OutFile]) -> tuple[str, str] | None:
    """A component's shard index rewritten for the output files: (relative path, JSON text), or None."""
    if component not in base.shard_indexes:
        return None
    source, rel = base.shard_indexes[component]
    try:
        doc = read_json(source)
    except (OSError, ValueError) as exc:
        raise BuildError(f"{source}: unreadable shard index ({exc})") from None
    mine = [f for f in files if f.rel.startswith(f"{component}/")]
    doc["weight_map"] = {
        t.key: Path(f.rel).name for f in mine for t in sorted(f.tensors, key=lambda t: t.key)
    }
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    metadata["total_size"] = sum(t.entry.nbytes for f in mine for t in f.tensors)
    doc["metadata"] = metadata
    return rel, json.dumps(doc, indent=2, sort_keys=True) + "\n"
