"""Per-block weights on a transformer denoiser: checked against the family and the base, then canonical.

A ``transformer:`` mapping in a set_adapters weight -> located problems (unknown group with
did-you-mean, a key that is no block index or range, overlapping ranges, blocks the base does not
have) and, for the plan, the canonical form of :mod:`lorarecipe.families.blocks` (string range keys
in block order, an explicit default), so equal specs give equal steps. Block counts come from the
base's headers (a diffusers folder's ``transformer_blocks.N.…`` or a BFL file's ``double_blocks.N.…``);
an uncached hub base is checked when it is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..families import get_family
from ..families.blocks import (
    block_counts_from_keys,
    canonical_block_spec,
    check_block_counts,
    parse_block_weights,
)
from .context import CompileContext
from .inputs import InputFacts

__all__ = ["block_counts", "canonical_component_weights", "check_transformer_blocks"]


def block_counts(inputs: InputFacts, component: str | None = None) -> dict[str, int] | None:
    """{group: number of blocks} of the base's denoiser (``component``: one of its experts), from its
    headers; None when unknown."""
    family = get_family(inputs.family)
    info = inputs.base_info
    name = component or (family.denoiser if family is not None else "")
    if family is None or info is None or name not in info.components:
        return None
    return block_counts_from_keys(family, info.components[name].tensors)


def check_transformer_blocks(
    ctx: CompileContext, where: tuple[Any, ...], spec: Mapping[Any, Any], inputs: InputFacts
) -> None:
    """Report every problem of one per-block spec at its place under ``where`` (the component key)."""
    family = get_family(inputs.family)
    if family is None:
        ctx.error(
            where,
            "per-block transformer weights need the base's family, which is unknown until it is fetched",
            "set base.family (e.g. 'flux')",
            on_key=True,
        )
        return
    weights, problems = parse_block_weights(family, spec)
    counts = block_counts(inputs, str(where[-1]) if where[-1] in family.denoisers else None)
    if weights is not None and counts is not None:
        problems += check_block_counts(weights, counts)
    for problem in problems:
        ctx.error((*where, *problem.path), problem.message, problem.hint, on_key=problem.on_key)


def canonical_component_weights(weights: Mapping[str, Any], family_key: str | None) -> dict[str, Any]:
    """A per-component weight dict (model_dump) -> the plan's form, block specs canonical."""
    family = get_family(family_key)
    out = dict(weights)
    for component in family.denoisers if family is not None else ():
        spec = out.get(component)
        if isinstance(spec, Mapping) and family is not None:
            parsed, _ = parse_block_weights(family, spec)
            if parsed is not None:
                out[component] = canonical_block_spec(parsed)
    return out
