"""Does an adapter fit the base? Its family against the base's, the experts it is loaded into, and
which blocks of a block-grouped denoiser it touches — from the LoRA's header facts and the base's.

Used by :mod:`lorarecipe.compiler.inputs` while it checks each adapter; torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..families import family_label, get_family
from ..families.original_names import blocks_touched, lora_targets
from ..inspect import LoraInfo, check_lora_against_base
from .context import CompileContext

if TYPE_CHECKING:
    from .inputs import InputFacts

__all__ = ["blocks_of", "check_experts", "family_mismatch", "other_family"]


def other_family(info: LoraInfo, inputs: InputFacts) -> bool:
    """The LoRA is of a known family other than the base's, whose loader does not read it (a FLUX.1
    LoRA on Chroma is read: its modules are checked one by one where the base's are known)."""
    family = get_family(inputs.family)
    read = family.reads_loras_of if family is not None else ()
    return bool(info.family and inputs.family and info.family != inputs.family and info.family not in read)


def family_mismatch(info: LoraInfo, inputs: InputFacts) -> str:
    """'the LoRA is a Qwen-Image LoRA (why) but the base is FLUX.1 (why)', as the compat check words it."""
    base = inputs.base_info
    if base is not None and base.family == inputs.family:
        conflict = check_lora_against_base(info, base).family_conflict
        if conflict is not None:
            return conflict
    lora, base_label = family_label(info.family), family_label(inputs.family)
    article = "an" if lora.startswith("S") else "a"
    return f"the LoRA is {article} {lora} LoRA ({info.family_evidence}) but the base is {base_label}"


def check_experts(ctx: CompileContext, inputs: InputFacts, name: str, spec: Any) -> bool:
    """``load_into`` names experts the family and the base have; a base with two experts needs it (a
    LoRA silently applied to the high-noise expert only is what diffusers' default would give)."""
    family = get_family(inputs.family)
    where = ("adapters", name, "load_into")
    if spec.load_into is not None and family is not None and not family.experts:
        ctx.error(
            where,
            f"{family.label} has one denoiser; 'load_into' is for families with two experts (Wan 2.2 A14B)",
            "remove load_into",
            on_key=True,
        )
        return False
    components = inputs.base_info.components if inputs.base_info is not None else None
    if family is None or not family.experts or components is None:
        return True
    present = [e for e in family.experts if e in components]
    for index, expert in enumerate(spec.load_into or ()):
        if expert not in present:
            ctx.error(
                (*where, index),
                f"the base has no {expert} (its denoisers: {', '.join(present)})",
                "Wan 2.1 and TI2V-5B have one transformer; only Wan 2.2 A14B has transformer_2",
            )
            return False
    if len(present) > 1 and spec.load_into is None:
        ctx.error(
            ("adapters", name),
            f"the base has two experts ({', '.join(present)}: high-noise and low-noise steps): say which "
            "this LoRA is loaded into",
            "add load_into: [transformer], [transformer_2], or [transformer, transformer_2]",
            on_key=True,
        )
        return False
    return True


def blocks_of(info: LoraInfo, family_key: str | None) -> tuple[str | None, int]:
    """Which blocks of a block-grouped denoiser a LoRA touches ('double_blocks 0-18, …'), and how
    many of its modules are fused original-layout ones (FLUX.1 qkv, linear1); (None, 0) otherwise."""
    family = get_family(family_key)
    if family is None or not family.block_groups:
        return None, 0
    modules: list[str] = []
    fused = 0
    for module in info.modules:
        if module.component in family.denoisers:
            targets, split = lora_targets(family, module.name)
            modules.extend(targets)
            fused += split
    return (blocks_touched(family, modules) if modules else None), fused
