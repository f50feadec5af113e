"""A base checkpoint (diffusers folder or one LDM/SGM/BFL file) -> :class:`BaseInfo` from headers.

Reads ``model_index.json``, the components' ``config.json`` and the safetensors headers of their
weights, never the weights. A component that only has pickle weights (``*.bin``) is refused
here, before anything could unpickle it. The family comes from the pipeline class, then from
shapes (cross-attention width), so tiny test models report ``None`` instead of a guess.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import InputUnavailableError, UnsafeInputError
from ..families import FAMILIES, family_label, family_of_pipeline
from ..fs.json_files import parse_json, read_json
from .safetensors_header import DTYPE_BITS, PICKLE_SUFFIXES, SafetensorsHeader, read_header

__all__ = [
    "PIPELINE_FAMILIES",
    "BaseInfo",
    "ComponentInfo",
    "check_model_index",
    "inspect_diffusers_folder",
    "inspect_single_file",
    "weight_files",
]

MAX_CONFIG_BYTES = 16 * 1024 * 1024
_CROSS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_LUMINA2_WIDTH = 2304
_SD_PIPELINES = FAMILIES["sd1"].pipeline_classes  # shared by SD 1.x and 2.x: told apart by shapes
#: model_index.json class -> family, for the classes only one family uses
PIPELINE_FAMILIES: Mapping[str, str] = MappingProxyType(
    {
        cls: family.key
        for family in FAMILIES.values()
        for cls in family.pipeline_classes
        if family_of_pipeline(cls) == family.key
    }
)
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


@dataclass(frozen=True)
class ComponentInfo:
    """One model component: its class, weight files and tensors (key -> (dtype, shape))."""

    name: str
    class_name: str | None
    files: tuple[str, ...]
    tensors: Mapping[str, tuple[str, tuple[int, ...]]] = field(hash=False)


@dataclass(frozen=True)
class BaseInfo:
    """What a base checkpoint is: family, pipeline class, denoiser dtype, components, sizes."""

    kind: str
    family: str | None
    family_evidence: str
    pipeline_class: str | None
    dtype: str | None
    components: Mapping[str, ComponentInfo] = field(hash=False)
    total_bytes: int
    largest_tensor_bytes: int


def _read_json(path: Path) -> dict[str, Any]:
    """A small JSON config -> dict. Malformed or oversized configs are refused, not guessed at."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise InputUnavailableError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UnsafeInputError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a config file")
    return parse_json(raw, str(path), max_bytes=MAX_CONFIG_BYTES, expect=dict)  # type: ignore[no-any-return]


def _nbytes(dtype: str, shape: Iterable[int]) -> int:
    return DTYPE_BITS.get(dtype, 8) * math.prod(shape) // 8


def _plain_name(name: Any, index: Path) -> str:
    """A shard name from an index file must be a file beside it, never a path elsewhere."""
    if (
        not isinstance(name, str)
        or not name.endswith(".safetensors")
        or "/" in name
        or "\\" in name
        or name.startswith(".")
    ):
        raise UnsafeInputError(
            f"{index}: weight_map names {str(name)[:80]!r}, not a .safetensors file in the same folder"
        )
    return name


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """Component folder -> the safetensors files diffusers would load ([] when it has no weights)."""
    names: list[str] = []
    for stem in _WEIGHT_STEMS:
        if variant:
            names += [
                f"{stem}.safetensors.index.{variant}.json",
                f"{stem}.{variant}.safetensors.index.json",
                f"{stem}.{variant}.safetensors",
            ]
        names += [f"{stem}.safetensors.index.json", f"{stem}.safetensors"]
    for name in names:
        candidate = folder / name
        if not candidate.is_file():
            continue
        if not name.endswith(".json"):
            return [candidate]
        weight_map = _read_json(candidate).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UnsafeInputError(f"{candidate}: no 'weight_map' object")
        shards = sorted({_plain_name(v, candidate) for v in weight_map.values()})
        for shard in shards:
            if not (folder / shard).is_file():
                raise InputUnavailableError(f"{candidate}: shard {shard!r} is missing")
        return [folder / shard for shard in shards]
    present = sorted(p.name for p in folder.iterdir() if p.is_file())
    pickles = [n for n in present if n.lower().endswith(PICKLE_SUFFIXES)]
    others = [n for n in present if n.endswith(".safetensors")]
    if others:
        found = ", ".join(others[:3])
        hint = f"variant {variant!r} not found" if variant else f"set the variant (found {found})"
        raise InputUnavailableError(f"{folder}: no {_WEIGHT_STEMS[0]}/model safetensors weights; {hint}")
    if pickles:
        raise UnsafeInputError(
            f"{folder}: only pickle weights ({', '.join(pickles[:3])}); lorarecipe never "
            "loads pickle files: convert them to .safetensors"
        )
    return []


def weight_files(folder: Path, variant: str | None) -> tuple[list[Path], Path | None]:
    """The safetensors files diffusers/transformers load from a component folder (and the shard index)."""
    for stem in _WEIGHT_STEMS:
        tags = [f".{variant}", ""] if variant else [""]
        for tag in tags:
            index = folder / (f"{stem}.safetensors.index{tag}.json")
            if index.is_file():
                weight_map = read_json(index, max_bytes=MAX_CONFIG_BYTES).get("weight_map")
                if not isinstance(weight_map, dict) or not all(
                    isinstance(n, str) for n in weight_map.values()
                ):
                    raise UnsafeInputError(f"{index}: 'weight_map' must map tensor names to file names")
                names = sorted(set(weight_map.values()))
                if any("/" in n or "\\" in n or n.startswith(".") for n in names):
                    raise UnsafeInputError(f"{index}: shard names must be plain file names")
                return [folder / n for n in names], index
            single = folder / f"{stem}{tag}.safetensors"
            if single.is_file():
                return [single], None
    return [], None


def _summarize(headers: list[SafetensorsHeader]) -> tuple[int, int]:
    largest = max((h.largest_tensor_bytes for h in headers), default=0)
    return sum(h.total_tensor_bytes for h in headers), largest


def _denoiser_dtype(components: Mapping[str, ComponentInfo]) -> str | None:
    denoiser = components.get("unet") or components.get("transformer")
    if denoiser is None:
        return None
    weight: Counter[str] = Counter()
    for dtype, shape in denoiser.tensors.values():
        weight[dtype] += _nbytes(dtype, shape)
    floating = [(n, d) for d, n in weight.items() if d.startswith(("F", "BF"))]
    return _DTYPES.get(max(floating)[1]) if floating else None


def inspect_diffusers_folder(path: Path, variant: str | None = None) -> BaseInfo:
    """A ``save_pretrained`` pipeline folder -> BaseInfo (headers and configs only)."""
    root = Path(path)
    if not root.is_dir():
        raise InputUnavailableError(f"{root}: no such folder")
    index = check_model_index(root)  # untrusted: only diffusers/transformers classes may be named
    class_name = index.get("_class_name") if isinstance(index.get("_class_name"), str) else None
    components: dict[str, ComponentInfo] = {}
    headers: list[SafetensorsHeader] = []
    for name, value in sorted(index.items()):
        if name.startswith("_") or not (isinstance(value, list) and len(value) == 2 and value[0] is not None):
            continue
        folder = root / name
        if not folder.is_dir():
            continue
        files = _weight_files(folder, variant)
        if not files:
            continue
        parts = [read_header(f) for f in files]
        headers += parts
        tensors = {k: (t.dtype, t.shape) for h in parts for k, t in h.tensors.items()}
        components[name] = ComponentInfo(
            name=name,
            class_name=value[1] if isinstance(value[1], str) else None,
            files=tuple(str(f.relative_to(root)) for f in files),
            tensors=MappingProxyType(tensors),
        )
    family, evidence = _folder_family(root, class_name, components)
    total, largest = _summarize(headers)
    return BaseInfo(
        "diffusers_folder",
        family,
        evidence,
        class_name,
        _denoiser_dtype(components),
        MappingProxyType(components),
        total,
        largest,
    )


def _folder_family(
    root: Path, class_name: str | None, components: Mapping[str, ComponentInfo]
) -> tuple[str | None, str]:
    if class_name is not None and class_name in PIPELINE_FAMILIES:
        family = PIPELINE_FAMILIES[class_name]
        return family, f"model_index.json names {class_name} ({family_label(family)})"
    if class_name not in _SD_PIPELINES:
        return None, f"model_index.json names {class_name!r}, not a pipeline lorarecipe knows"
    width: Any = None
    source = ""
    config = root / "unet" / "config.json"
    if config.is_file():
        width, source = _read_json(config).get("cross_attention_dim"), "unet/config.json cross_attention_dim"
    if width is None and "unet" in components:
        width, source = _cross_width(components["unet"].tensors, ""), "unet attn2.to_k input width"
    if width is None:
        return None, f"{class_name} without a readable unet cross-attention width"
    found = _CROSS.get(width) if isinstance(width, int) and width != 2048 else None
    if found is None:
        return None, (
            f"{class_name} with {source} {width}: neither SD 1.x (768) nor SD 2.x (1024), "
            "e.g. a tiny test model"
        )
    return found, f"{class_name} with {source} {width} ({family_label(found)})"


def _cross_width(tensors: Mapping[str, tuple[str, tuple[int, ...]]], prefix: str) -> int | None:
    widths = {
        s[1]
        for k, (_, s) in tensors.items()
        if k.startswith(prefix) and k.endswith("attn2.to_k.weight") and len(s) == 2
    }
    return next(iter(widths)) if len(widths) == 1 else None


# (prefix, component) in match order; "denoiser" becomes 'unet' or 'transformer' by family.
_SINGLE_PREFIXES = (
    ("model.diffusion_model.", "denoiser"),
    ("first_stage_model.", "vae"),
    ("vae.", "vae"),
    ("cond_stage_model.transformer.", "text_encoder"),
    ("cond_stage_model.model.", "text_encoder"),
    ("conditioner.embedders.0.transformer.", "text_encoder"),
    ("conditioner.embedders.0.model.", "text_encoder"),
    ("conditioner.embedders.1.model.", "text_encoder_2"),
    ("text_encoders.clip_l.transformer.", "text_encoder"),
    ("text_encoders.clip_g.transformer.", "text_encoder_2"),
    ("text_encoders.t5xxl.transformer.", "t5"),
)
_BARE_DIT = (
    "double_blocks.",
    "single_blocks.",
    "joint_blocks.",
    "img_in.",
    "txt_in.",
    "time_in.",
    "vector_in.",
    "guidance_in.",
    "final_layer.",
    "x_embedder.",
    "context_embedder.",
    "t_embedder.",
    "y_embedder.",
    "transformer_blocks.",
    "single_transformer_blocks.",
    "time_text_embed.",
    "proj_out.",
    "norm_out.",
    "pos_embed.",
    "double_stream_modulation_img.",  # FLUX.2
    "double_stream_modulation_txt.",
    "single_stream_modulation.",
    "blocks.",  # Wan
    "patch_embedding.",
    "text_embedding.",
    "time_embedding.",
    "time_projection.",
    "head.",
    "img_emb.",
    "txt_norm.",  # Qwen-Image
    "layers.",  # Z-Image
    "noise_refiner.",
    "context_refiner.",
    "cap_embedder.",
    "x_pad_token",
    "cap_pad_token",
    "distilled_guidance_layer.",  # Chroma
)
_BARE_UNET = (
    "down_blocks.",
    "up_blocks.",
    "mid_block.",
    "conv_in.",
    "conv_out.",
    "conv_norm_out.",
    "time_embedding.",
    "add_embedding.",
    "input_blocks.",
    "middle_block.",
    "output_blocks.",
    "time_embed.",
    "label_emb.",
    "out.",
)


def _single_family(keys: Mapping[str, tuple[str, tuple[int, ...]]]) -> tuple[str | None, str]:
    def first(*needles: str) -> str | None:
        return next((k for k in keys if any(k.startswith(n) or f".{n}" in k for n in needles)), None)

    if key := first("joint_blocks."):
        return "sd3", f"MMDiT key '{key}' (SD 3)"
    if key := first("single_stream_modulation.lin.", "double_stream_modulation_img.lin."):
        return "flux2", f"BFL key '{key}' with shared modulation (FLUX.2)"
    if (key := first("head.modulation")) and first("patch_embedding."):
        return "wan", f"Wan key '{key}' (Wan)"
    if (key := first("distilled_guidance_layer.")) and first("double_blocks."):
        return "chroma", f"BFL key '{key}' (Chroma's distilled guidance layer)"
    if key := first("double_blocks."):
        return "flux", f"BFL key '{key}' (FLUX.1)"
    if (key := first("noise_refiner.", "context_refiner.")) and (qkv := first("layers.0.attention.")):
        width = keys[qkv][1][-1] if len(keys[qkv][1]) == 2 else None
        if width == _LUMINA2_WIDTH:
            return None, f"NextDiT key '{key}' of width {width}: Lumina Image 2.0, not supported"
        return "z_image", f"NextDiT keys '{key}' and '{qkv}' (Z-Image)"
    if key := first("transformer_blocks.0.img_mod.", "transformer_blocks.0.img_mlp."):
        return "qwen_image", f"key '{key}' (Qwen-Image's image-stream modulation/MLP)"
    if (key := first("model.diffusion_model.input_blocks.")) and (te := first("conditioner.embedders.1.")):
        return "sdxl", f"SGM keys '{key}' and '{te}' (SDXL)"
    if key and (te := first("cond_stage_model.transformer.")):
        return "sd1", f"LDM keys '{key}' and CLIP text encoder '{te}' (SD 1.x)"
    if key and (te := first("cond_stage_model.model.")):
        return "sd2", f"LDM keys '{key}' and OpenCLIP text encoder '{te}' (SD 2.x)"
    for prefix in ("model.diffusion_model.", ""):
        width = _cross_width(keys, prefix)
        if width in _CROSS:
            return _CROSS[width], f"UNet attn2.to_k input width {width} ({family_label(_CROSS[width])})"
    return None, "no known LDM/SGM/BFL/MMDiT key layout"


Table = dict[str, tuple[str, tuple[int, ...]]]


def _split_single(header: SafetensorsHeader, family: str | None) -> dict[str, Table]:
    known = FAMILIES.get(family or "")
    denoiser = known.denoiser if known is not None else "unet"
    t5 = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    parts: dict[str, Table] = {}
    for key, info in header.tensors.items():
        component, rest = "other", key
        for prefix, name in _SINGLE_PREFIXES:
            if key.startswith(prefix):
                component, rest = {"denoiser": denoiser, "t5": t5}.get(name, name), key[len(prefix) :]
                break
        else:
            if key.startswith(_BARE_DIT):
                component = "transformer"
            elif key.startswith(_BARE_UNET):
                component = "unet"
        parts.setdefault(component, {})[rest] = (info.dtype, info.shape)
    return parts


def inspect_single_file(path: Path) -> BaseInfo:
    """One checkpoint file (LDM/SGM/BFL layout) -> BaseInfo, components split by key prefix."""
    header = read_header(path)
    family, evidence = _single_family({k: (t.dtype, t.shape) for k, t in header.tensors.items()})
    components = {
        name: ComponentInfo(name, None, (str(path),), MappingProxyType(tensors))
        for name, tensors in sorted(_split_single(header, family).items())
    }
    return BaseInfo(
        "single_file",
        family,
        evidence,
        FAMILIES[family].pipeline_class if family is not None and family in FAMILIES else None,
        _denoiser_dtype(components),
        MappingProxyType(components),
        header.total_tensor_bytes,
        header.largest_tensor_bytes,
    )


_ALLOWED_LIBRARIES = {"diffusers", "transformers", None}
_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_KNOWN_PIPELINES = {
    cls for info in FAMILIES.values() for cls in (info.pipeline_class, *info.pipeline_classes)
}


def check_model_index(folder: Path) -> dict[str, Any]:
    """Refuse a model_index.json that would make diffusers import anything but diffusers/transformers."""
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise InputUnavailableError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    index: dict[str, Any] = read_json(index_path, max_bytes=MAX_CONFIG_BYTES)
    cls = index.get("_class_name")
    if not isinstance(cls, str) or cls not in _KNOWN_PIPELINES:
        raise UnsafeInputError(
            f"{index_path}: pipeline class {cls!r} is not one lorarecipe loads "
            f"({', '.join(sorted(_KNOWN_PIPELINES))})"
        )
    for key, value in index.items():
        if key.startswith("_") or value is None or isinstance(value, (bool, int, float, str)):
            continue  # plain config values (e.g. requires_safety_checker) are not components
        shape_ok = isinstance(value, list) and len(value) == 2
        if not shape_ok or not all(part is None or isinstance(part, str) for part in value):
            raise UnsafeInputError(
                f"{index_path}: component {key[:80]!r} has an unexpected entry {str(value)[:120]} "
                "(expected [library, class name])"
            )
        if not _COMPONENT_NAME.match(key):
            raise UnsafeInputError(
                f"{index_path}: component name {key[:80]!r} is not a plain folder name (components are "
                "folders beside model_index.json: no '..', separators or absolute paths)"
            )
        library = value[0]
        if library not in _ALLOWED_LIBRARIES:
            raise UnsafeInputError(
                f"{index_path}: component {key!r} names library {library!r}; only diffusers and "
                "transformers components are loaded (no custom code)"
            )
    return index
