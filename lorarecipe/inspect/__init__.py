"""Static analysis from safetensors headers only: what a LoRA or a base checkpoint is, and whether
they fit. Torch-free and fast, for ``lorarecipe validate`` / ``plan``."""

from __future__ import annotations

from .base_model import BaseInfo, ComponentInfo, inspect_diffusers_folder, inspect_single_file
from .compat import CompatReport, check_lora_against_base
from .lora_keys import LoraInfo, LoraModule, inspect_lora
from .safetensors_header import (
    MAX_HEADER_BYTES,
    PICKLE_SUFFIXES,
    SafetensorsHeader,
    TensorInfo,
    parse_header_bytes,
    read_header,
)

__all__ = [
    "MAX_HEADER_BYTES",
    "PICKLE_SUFFIXES",
    "BaseInfo",
    "CompatReport",
    "ComponentInfo",
    "LoraInfo",
    "LoraModule",
    "SafetensorsHeader",
    "TensorInfo",
    "check_lora_against_base",
    "inspect_diffusers_folder",
    "inspect_lora",
    "inspect_single_file",
    "parse_header_bytes",
    "read_header",
]
