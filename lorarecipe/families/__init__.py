"""Model families as data: one small module of tables per family, and this registry (torch-free).

Each family module (``sd``: SD 1.x/2.x/SDXL; ``sd3``: SD 3/3.5; ``flux1``: FLUX.1; ``flux2``: FLUX.2
dev and Klein; ``qwen_image``: Qwen-Image and Qwen-Image-Edit; ``z_image``: Z-Image; ``wan``: Wan
2.1/2.2 video; ``chroma``: Chroma) fills in a
:class:`~lorarecipe.families.spec.Family`: pipeline classes and LoRA components, block groups for
per-block weights, its original-layout module table (single-file names, kohya/BFL LoRA names), kohya
prefixes and grid call conventions. Every stage reads these tables — ``validate``/``plan`` included,
so nothing here imports torch. A new family is a new module plus one line in :data:`FAMILIES`;
``OTHER_ARCHITECTURES`` names architectures recognized in LoRA headers (so a mismatch names both
sides) that are not built yet.

``blocks`` parses and resolves per-block DiT weights; ``original_names`` maps original-layout names
to diffusers names and back.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .chroma import CHROMA
from .flux1 import FLUX1
from .flux2 import FLUX2
from .qwen_image import QWEN_IMAGE
from .sd import SD1, SD2, SDXL
from .sd3 import SD3
from .spec import BlockGroup, Family, GridCall, ModuleRule, ParamRule, SingleFileComponent, Split, Variant
from .wan import WAN
from .z_image import Z_IMAGE

__all__ = [
    "FAMILIES",
    "OTHER_ARCHITECTURES",
    "BlockGroup",
    "Family",
    "GridCall",
    "ModuleRule",
    "ParamRule",
    "SingleFileComponent",
    "Split",
    "Variant",
    "family_label",
    "family_of_pipeline",
    "get_family",
    "needs_input_image",
]

#: The families lorarecipe builds, by the key a recipe's ``base.family`` names.
FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        f.key: f
        for f in (  # one family per line
            SD1,
            SD2,
            SDXL,
            SD3,
            FLUX1,
            FLUX2,
            QWEN_IMAGE,
            Z_IMAGE,
            WAN,
            CHROMA,
        )
    }
)

#: Architectures recognized in LoRA headers but not built yet (key -> label), for mismatch errors.
OTHER_ARCHITECTURES: Mapping[str, str] = MappingProxyType({"lumina2": "Lumina Image 2.0"})


def get_family(key: str | None) -> Family | None:
    """A family key (or None) -> its Family, None when unknown."""
    return FAMILIES.get(key or "")


def family_label(key: str | None) -> str:
    """A family or architecture key -> its label ('FLUX.1', 'Qwen-Image'); 'unknown' for None."""
    if key is None:
        return "unknown"
    family = FAMILIES.get(key)
    return family.label if family is not None else OTHER_ARCHITECTURES.get(key, key)


def family_of_pipeline(class_name: str | None) -> str | None:
    """A model_index.json ``_class_name`` -> the one family it belongs to (None when several share it,
    like StableDiffusionPipeline for SD 1.x and 2.x, or when none does)."""
    owners = [f.key for f in FAMILIES.values() if class_name in f.pipeline_classes]
    return owners[0] if len(owners) == 1 else None


def needs_input_image(class_name: str | None, family: str | None) -> Family | None:
    """A pipeline class (and the base's family, None when unknown) -> the family whose table says the
    class needs an input image (img2img, inpaint, edit, image-to-video), else None. A base of unknown
    family (an SD folder of a width neither SD 1.x nor 2.x has) is judged by any family that lists the
    class, so a grid on it is refused as on a known one."""
    known = FAMILIES.get(family or "")
    candidates = [known] if known is not None else list(FAMILIES.values())
    return next((f for f in candidates if class_name in f.image_input_pipelines), None)
