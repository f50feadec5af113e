"""The LoRA key layouts diffusers 0.42 reads, and the ones it misreads or loads nothing from.

Component names in the order lorarecipe lists them, kohya's name prefixes, and the reasons a file's
layout cannot be loaded (stems + the base family's converted layouts -> a sentence, or None): raw
PEFT keys, ai-toolkit's ``diffusion_model.`` prefix with original block names, kohya suffixes without
kohya prefixes, unprefixed PEFT names, non-float factors. Used by :mod:`.lora_keys`; torch-free.
"""

from __future__ import annotations

from ..families import FAMILIES
from ..families.original_names import match_lora_module
from .safetensors_header import SafetensorsHeader

__all__ = [
    "COMPONENT_ORDER",
    "KOHYA_PREFIXES",
    "KOHYA_STARTS",
    "RAW_PEFT",
    "non_float_weights",
    "prefix_problem",
]

COMPONENT_ORDER = (
    "unet",
    "transformer",
    "transformer_2",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "unknown",
)
KOHYA_PREFIXES = (
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("lora_unet_", "unet"),
    ("lora_transformer_", "transformer"),
)  # the last one is OneTrainer's
KOHYA_STARTS = tuple(prefix for prefix, _ in KOHYA_PREFIXES)
RAW_PEFT = (
    "raw PEFT adapter keys ('base_model.model.' prefix): diffusers 0.42 misreads them "
    "(Flux fails, SD loads nothing); re-save with the pipeline's save_lora_weights"
)
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def family_reads(stems: list[str], reads: frozenset[str]) -> bool:
    """Whether the base family's diffusers loader converts every stem's prefix style (``reads``: the
    family's ``lora_layouts``, 'bare' only when the file triggers its converter)."""
    if not reads:
        return False
    for stem in stems:
        head = stem.split(".", 1)[0]
        if stem.startswith("diffusion_model."):
            if "diffusion_model" not in reads:
                return False
        elif (
            head in COMPONENT_ORDER or stem.startswith((*KOHYA_STARTS, "base_model.")) or "bare" not in reads
        ):
            return False
    return True


def original_names(stems: list[str]) -> bool:
    """Whether every stem is ``diffusion_model.`` + a module of a family whose original-layout LoRAs
    lorarecipe converts itself (ai-toolkit's FLUX.1 files)."""
    for family in FAMILIES.values():
        if family.converts_original_loras and all(
            s.startswith("diffusion_model.") and match_lora_module(family, s[len("diffusion_model.") :])
            for s in stems
        ):
            return True
    return False


def prefix_problem(kind: str, stems: list[str], control: bool, reads: frozenset[str]) -> str | None:
    """Layouts diffusers 0.42 reads without error but loads nothing from (or misreads); ``reads``: the
    prefix styles the base family's loader converts (Qwen-Image, Z-Image)."""
    if kind == "peft" and any(s.startswith("base_model.model.") for s in stems):
        return RAW_PEFT
    if family_reads(stems, reads):
        return None
    converted = original_names(stems)
    if kind == "peft" and any(s.startswith("diffusion_model.") for s in stems) and not converted:
        return (
            "'diffusion_model.' prefix with original (BFL/LDM) block names, as ai-toolkit writes: "
            "diffusers 0.42's Flux/SD loaders return it unchanged and load nothing"
        )
    if kind == "kohya" and not any(s.startswith(KOHYA_STARTS) for s in stems) and not converted:
        return (
            "kohya suffixes ('.lora_down.weight') on dotted module names without 'lora_unet_'/"
            "'lora_te_' prefixes: diffusers' SD/SDXL/Flux loaders do not read this layout"
        )
    prefixed = any(s.split(".", 1)[0] in COMPONENT_ORDER for s in stems)
    if (
        kind in ("peft", "diffusers_old") and not prefixed and not control and not converted
    ):  # BFL control: converted
        return (
            "module names carry no component prefix ('unet.', 'transformer.', 'text_encoder.'): "
            "diffusers 0.42 would silently load nothing from this file"
        )
    return None


def non_float_weights(header: SafetensorsHeader) -> str | None:
    """LoRA factors stored as integers/bools/fp8 would be read as garbage values: refuse them."""
    for key, info in header.tensors.items():
        if key.endswith((".weight", ".alpha")) and info.dtype not in _FLOAT_DTYPES:
            return (
                f"tensor {key!r} has dtype {info.dtype}; LoRA weights must be F16, BF16, F32 or F64 "
                "(quantized or integer LoRA files are not supported)"
            )
    return None
