"""Fused diffusers pipeline → one single-file checkpoint in the original layout: LDM (SD 1.x/2.x), SGM
(SDXL), BFL (FLUX.1: the transformer only, as ``flux1-dev.safetensors``).

diffusers reads such files (``from_single_file``) but cannot write them. ``single_file_layout`` is
the plan: from key names and shapes only (safetensors headers, no torch), every output tensor and the
diffusers tensors it is made of, so a streaming writer can fill the file one tensor at a time and a
fuser can add a LoRA delta for a diffusers module into the right rows of the right output tensor.
``to_single_file_state_dict`` executes it in memory. Every input key is placed exactly once, or a
``ValueError`` names the ones that are not: weights are never dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..families import FAMILIES as FAMILY_REGISTRY
from .singlefile_names import (
    DERIVED,
    Shape,
    StoredForm,
    Target,
    map_hf_clip_keys,
    map_open_clip_keys,
    map_rule_keys,
    map_unet_keys,
    map_vae_keys,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "FAMILIES",
    "OutputTensor",
    "Piece",
    "apply_transform",
    "inverse_lookup",
    "single_file_layout",
    "to_single_file_state_dict",
]

ComponentKind = Literal["unet", "vae", "hf_clip", "open_clip", "rules"]

# family → component → (key prefix in the single file, naming scheme), from each family's table. The
# LDM/SGM prefixes are the ones diffusers' reader strips: LDM_UNET_KEY, LDM_VAE_KEYS[0],
# LDM_CLIP_PREFIX_TO_REMOVE, the OpenCLIP prefixes in create_diffusers_clip_model_from_ldm; FLUX.1's
# transformer is stored without a prefix, as in flux1-dev.safetensors ('rules': the family's tables).
FAMILIES: dict[str, dict[str, tuple[str, ComponentKind]]] = {
    key: {component: (place.prefix, place.scheme) for component, place in family.single_file_layout.items()}
    for key, family in FAMILY_REGISTRY.items()
    if family.single_file
}

# diffusers' reader skips these SD2 OpenCLIP keys (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE): ViT-H's last
# layer and projection are unused by SD2, whose diffusers text encoder has 23 layers and no projection.
_SD2_IGNORED_LAYER = 23


@dataclass(frozen=True)
class Piece:
    """One diffusers tensor (``component``, ``key``); ``rows`` = the ``[start, stop)`` rows of the output
    tensor it fills when several pieces are concatenated along dim 0, else ``None`` (the whole tensor)."""

    component: str
    key: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the single file: ``key``, made of ``sources`` (one: a rename; several: concatenated
    along dim 0, in order), then ``transform`` (the stored form, or None); ``shape`` as stored."""

    key: str
    sources: tuple[Piece, ...]
    transform: StoredForm | None
    shape: Shape | None = None


def single_file_layout(
    family: str,
    components: Mapping[str, Mapping[str, Shape]],
    configs: Mapping[str, Mapping[str, Any]],
) -> list[OutputTensor]:
    """Plan a single file: {component: {diffusers key: shape}} + configs → output tensors sorted by key.

    ``family`` is 'sd1', 'sd2' or 'sdxl'; components are 'unet', 'vae', 'text_encoder' and (SDXL)
    'text_encoder_2', any subset; ``configs`` holds each component's config.json dict (required for
    the UNet and the VAE, whose block numbering depends on it). Raises ``ValueError`` for an unknown
    family or component, for keys with no place in the layout (all named), and for models the
    single-file reader of diffusers cannot read back faithfully.
    """
    table = FAMILIES.get(family)
    if table is None:
        raise ValueError(f"unknown single-file family {family!r}; expected one of {sorted(FAMILIES)}")
    unknown = sorted(set(components) - set(table))
    if unknown:
        raise ValueError(
            f"{family}: no single-file place for component(s) {unknown}; expected {sorted(table)}"
        )
    _check_reader_limits(family, components)

    groups: dict[str, list[tuple[Target, Piece, Shape]]] = {}
    unmapped: list[str] = []
    for component, shapes in components.items():
        prefix, kind = table[component]
        if kind == "rules":
            targets = map_rule_keys(FAMILY_REGISTRY[family], shapes)
        else:
            targets = _map_component(kind, component, shapes, configs.get(component))
        for key, target in targets.items():
            if target is None:
                unmapped.append(f"{component}: {key}")
            elif target is not DERIVED:
                groups.setdefault(prefix + target.key, []).append(
                    (target, Piece(component, key), shapes[key])
                )
    if unmapped:
        shown = "\n  ".join(unmapped[:50]) + ("\n  …" if len(unmapped) > 50 else "")
        raise ValueError(
            f"{family}: {len(unmapped)} tensor(s) have no place in the single-file layout "
            f"(unsupported module or config):\n  {shown}"
        )
    return [_assemble(key, members) for key, members in sorted(groups.items())]


def to_single_file_state_dict(
    family: str,
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    configs: Mapping[str, Mapping[str, Any]],
) -> dict[str, torch.Tensor]:
    """{component: diffusers state dict} → the single-file state dict (see ``single_file_layout``).

    Renamed tensors are passed through as the same objects (no copy, dtype kept); concatenated and
    transposed ones are new contiguous tensors, ready for ``safetensors.torch.save_file``.
    """
    import torch

    shapes = {c: {k: tuple(t.shape) for k, t in sd.items()} for c, sd in state_dicts.items()}
    out: dict[str, torch.Tensor] = {}
    for tensor in single_file_layout(family, shapes, configs):
        parts = [state_dicts[p.component][p.key] for p in tensor.sources]
        joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        out[tensor.key] = apply_transform(joined, tensor.transform)
    return out


def inverse_lookup(
    layout: list[OutputTensor],
) -> dict[tuple[str, str], tuple[str, tuple[int, int] | None, str | None]]:
    """Layout → {(component, diffusers key): (output key, rows or None, transform)}.

    A streaming fuser holding a delta ``d`` for a diffusers weight adds ``apply_transform(d, transform)``
    to ``out[key]`` (to ``out[key][rows[0]:rows[1]]`` when ``rows`` is set).
    """
    return {
        (piece.component, piece.key): (tensor.key, piece.rows, tensor.transform)
        for tensor in layout
        for piece in tensor.sources
    }


def apply_transform(tensor: torch.Tensor, transform: StoredForm | None) -> torch.Tensor:
    """A diffusers-shaped tensor (or delta) → its stored shape: CONV1X1 ``[o, i] → [o, i, 1, 1]``
    (VAE attention, a view), TRANSPOSE ``[p, h] → [h, p]`` (OpenCLIP text_projection, contiguous),
    SWAP_HALVES ``[a; b] → [b; a]`` (FLUX.1's final adaLN; its own inverse)."""
    if transform is None:
        return tensor
    if transform is StoredForm.CONV1X1:
        return tensor.reshape(*tensor.shape, 1, 1)
    if transform is StoredForm.SWAP_HALVES:
        import torch

        first, second = tensor.chunk(2, dim=0)
        return torch.cat([second, first], dim=0)
    return tensor.t().contiguous()


# --------------------------------------------------------------------------------------------- helpers


def _map_component(
    kind: ComponentKind, component: str, shapes: Mapping[str, Shape], config: Mapping[str, Any] | None
) -> dict[str, Target | None]:
    if kind in ("unet", "vae"):
        if config is None:
            raise ValueError(f"{component}: its config.json dict is needed (block numbering depends on it)")
        mapper: Callable[[Mapping[str, Shape], Mapping[str, Any]], dict[str, Target | None]]
        mapper = map_unet_keys if kind == "unet" else map_vae_keys
        return mapper(shapes, config)
    return map_hf_clip_keys(shapes) if kind == "hf_clip" else map_open_clip_keys(shapes)


def _assemble(key: str, members: list[tuple[Target, Piece, Shape]]) -> OutputTensor:
    """The diffusers tensors that landed on one output key → that output tensor (or a ValueError)."""
    first, piece, shape = members[0]
    if first.parts == 1:
        if len(members) > 1:
            names = ", ".join(f"{p.component}: {p.key}" for _, p, _ in members)
            raise ValueError(f"several tensors map to the single-file key {key!r}: {names}")
        return OutputTensor(key, (piece,), first.transform, _transformed_shape(shape, first.transform))
    members = sorted(members, key=lambda m: m[0].part)
    parts = [m[0].part for m in members]
    if parts != list(range(first.parts)) or any(m[0].parts != first.parts for m in members):
        have = ", ".join(p.key for _, p, _ in members)
        raise ValueError(f"single-file key {key!r} needs {first.parts} concatenated parts, found: {have}")
    if len({s[1:] for _, _, s in members}) != 1:  # heights may differ (FLUX.1 linear1: q | k | v | mlp)
        raise ValueError(f"single-file key {key!r}: parts differ in shape {[s for _, _, s in members]}")
    pieces, start = [], 0
    for _, p, s in members:
        pieces.append(Piece(p.component, p.key, (start, start + s[0])))
        start += s[0]
    return OutputTensor(key, tuple(pieces), None, (start, *shape[1:]))


def _transformed_shape(shape: Shape, transform: StoredForm | None) -> Shape:
    if transform is StoredForm.CONV1X1:
        return (*shape, 1, 1)
    if transform is StoredForm.TRANSPOSE:
        return shape[::-1]
    return shape


def _text_width(shapes: Mapping[str, Shape]) -> int | None:
    for key in ("embeddings.position_embedding.weight", "text_model.embeddings.position_embedding.weight"):
        if key in shapes:
            return shapes[key][-1]
    return None


def _check_reader_limits(family: str, components: Mapping[str, Mapping[str, Shape]]) -> None:
    """Refuse files that diffusers' reader would load wrongly, although their layout is the original's."""
    if family == "sd2" and "text_encoder" in components:
        ignored = [
            k
            for k in components["text_encoder"]
            if k.endswith("text_projection.weight") or f"layers.{_SD2_IGNORED_LAYER}." in k
        ]
        if ignored:
            raise ValueError(
                f"sd2 text_encoder: diffusers' single-file reader ignores OpenCLIP resblocks."
                f"{_SD2_IGNORED_LAYER} and text_projection in SD2 files, so {ignored[:3]} would not "
                "load back (SD2's text encoder is a 23-layer CLIPTextModel)"
            )
    if family == "sdxl" and {"text_encoder", "text_encoder_2"} <= set(components):
        width = _text_width(components["text_encoder"])
        if width is not None and width == _text_width(components["text_encoder_2"]):
            raise ValueError(
                f"sdxl: text_encoder and text_encoder_2 are both {width} wide; diffusers' single-file "
                "reader tells them apart by width and would load text_encoder into text_encoder_2"
            )
