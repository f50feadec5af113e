"""The built-in tiny models and LoRAs: names and inventory (torch-free).

Importing this package never imports torch, so ``validate`` and ``plan`` can use it. The builders
live in :mod:`lorarecipe.builtin.materialize` (torch side): ``builtin_base_path``, ``builtin_lora_path``.
"""

from __future__ import annotations

from .catalog import (
    BUILTIN_BASES,
    BUILTIN_LORAS,
    BUILTIN_VERSION,
    BuiltinBase,
    BuiltinLora,
    builtin_inventory,
)

__all__ = [
    "BUILTIN_BASES",
    "BUILTIN_LORAS",
    "BUILTIN_VERSION",
    "BuiltinBase",
    "BuiltinLora",
    "builtin_inventory",
]
