"""Static checks of a checkpoint difference (``adapters.<name>.checkpoint``), from headers only.

A fused or fine-tuned diffusers folder + the base -> located problems and the plan's check. The
checkpoint must be of the base's family and hold the weights of the base's LoRA components in the
same shapes (a 2-D or 4-D weight whose difference ``extract`` turns into a LoRA factor pair); its
difference is computed when built, weight by weight. It is only an input of ``extract`` merges: the
references check refuses it elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LorarecipeError
from ..families import family_label, get_family
from ..inspect import BaseInfo, inspect_diffusers_folder
from ..plan import Check
from .context import CompileContext

__all__ = ["check_difference", "difference_components"]


def check_difference(
    ctx: CompileContext, name: str, folder: Path, base: BaseInfo | None, family_key: str | None, describe: str
) -> BaseInfo | None:
    """The checkpoint's headers, checked against the base; None when they cannot be read."""
    where = ("adapters", name, "checkpoint")
    try:
        info = inspect_diffusers_folder(folder)
    except LorarecipeError as exc:
        ctx.error(where, exc.message)
        return None
    except (OSError, ValueError) as exc:
        ctx.error(where, f"cannot read the checkpoint: {exc}")
        return None
    if info.family and family_key and info.family != family_key:
        ctx.error(
            where,
            f"the checkpoint is {family_label(info.family)} ({info.family_evidence}), the base "
            f"{family_label(family_key)}: their difference is no adapter",
        )
        return None
    family = get_family(family_key or info.family)
    components = family.lora_components if family is not None else tuple(info.components)
    compared: dict[str, int] = {}
    misfits: list[str] = []
    for component in components:
        theirs = info.components.get(component)
        ours = base.components.get(component) if base is not None else None
        if theirs is None or (base is not None and ours is None):
            continue
        weights = {k: s for k, (_, s) in theirs.tensors.items() if k.endswith(".weight") and len(s) in (2, 4)}
        if ours is not None:
            for key, shape in weights.items():
                if key in ours.tensors and ours.tensors[key][1] != shape:
                    misfits.append(f"{component}.{key} {list(shape)} vs base {list(ours.tensors[key][1])}")
        compared[component] = len(weights)
    if misfits:
        ctx.error(where, f"{len(misfits)} weights differ in shape from the base's: {'; '.join(misfits[:3])}")
        return None
    if not compared:
        ctx.error(
            where, f"the checkpoint has none of the base's adapter components ({', '.join(components)})"
        )
        return None
    detail = ", ".join(f"{n} {c}" for c, n in compared.items())
    facts: tuple[tuple[str, Any], ...] = (("format", "checkpoint difference"), ("weights", compared))
    ctx.checks.append(
        Check(
            f"adapters.{name}",
            "ok",
            f"{describe}: checkpoint difference from the base ({detail} weights)",
            facts,
        )
    )
    return info


def difference_components(info: BaseInfo, family_key: str | None) -> tuple[str, ...]:
    """The adapter components a checkpoint difference covers (those of the family it holds)."""
    family = get_family(family_key or info.family)
    components = family.lora_components if family is not None else tuple(info.components)
    return tuple(c for c in components if c in info.components)
