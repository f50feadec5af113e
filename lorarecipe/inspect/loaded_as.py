"""A LoRA file's header facts -> the same facts as the base's family will load the file (pure Python).

Two things depend on the base and the recipe, not on the file: whether a bare-PEFT file
(``base_model.model.`` + diffusers names) loads — diffusers' FLUX.2 loader converts it, the others
misread it —, and which denoiser its modules land in. Wan 2.2 A14B has two experts and diffusers loads
one file into one of them (``load_into_transformer_2``): a recipe's ``load_into: [transformer_2]``
moves the file's ``transformer`` modules to ``transformer_2``, and ``[transformer, transformer_2]``
puts them in both, so every later check (ranks per component, fit against the base, fused components)
sees what will be loaded where. A LyCORIS/DoRA file (which lorarecipe applies itself) moves the same
way (:func:`lycoris_as_loaded`, used by the compiler and both executors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..families import Family
from .lora_keys import COMPONENT_ORDER, LoraInfo, LoraModule
from .lycoris_keys import LycorisInfo, LycorisModule

__all__ = ["as_loaded", "lycoris_as_loaded"]


def as_loaded(info: LoraInfo, family: Family | None, load_into: Sequence[str] | None = None) -> LoraInfo:
    """``info`` as ``family`` loads the file into the experts ``load_into`` (see the module docstring)."""
    if family is not None and info.raw_peft and family.reads_raw_peft:
        info = replace(info, unsupported=None)
    targets = tuple(load_into or ())
    if family is None or not targets or targets == (family.denoiser,):
        return info
    modules: list[LoraModule] = []
    for module in info.modules:
        if module.component == family.denoiser:
            modules.extend(replace(module, component=target) for target in targets)
        else:
            modules.append(module)
    present = {m.component for m in modules}
    lycoris = lycoris_as_loaded(info.lycoris, family, targets) if info.lycoris is not None else None
    present |= {m.component for m in lycoris.modules} if lycoris is not None else set()
    return replace(
        info,
        modules=tuple(modules),
        components=tuple(c for c in COMPONENT_ORDER if c in present),
        lycoris=lycoris,
    )


def lycoris_as_loaded(
    info: LycorisInfo, family: Family | None, load_into: Sequence[str] | None = None
) -> LycorisInfo:
    """A LyCORIS/DoRA file's modules as loaded into the experts ``load_into`` names: each denoiser
    module once per expert (the same factors, applied to each expert's weight)."""
    targets = tuple(load_into or ())
    if family is None or not targets or targets == (family.denoiser,):
        return info
    modules: list[LycorisModule] = []
    for module in info.modules:
        if module.component == family.denoiser:
            modules.extend(replace(module, component=target) for target in targets)
        else:
            modules.append(module)
    return replace(info, modules=tuple(modules))
