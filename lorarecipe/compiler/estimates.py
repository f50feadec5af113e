"""Peak-memory estimates of each executor, from header sizes alone (shown by ``lorarecipe plan``).

Plan + input facts -> {executor: bytes or None}. The diffusers route holds the whole pipeline plus
per-weight copies while fusing and saving; the streaming fuser holds the LoRAs plus a few copies of
the largest base tensor. The constants come from ``benchmarks/fuse.py`` measurements (README table);
they are estimates for planning, not guarantees.
"""

from __future__ import annotations

from typing import Any

from .inputs import InputFacts

__all__ = ["RUNTIME_OVERHEAD_BYTES", "estimate_memory"]

#: RSS of a Python process with torch + diffusers + peft imported, before any model (measured ~0.45 GiB).
RUNTIME_OVERHEAD_BYTES = 480 * 1024**2
_DTYPE_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _lora_bytes(inputs: InputFacts) -> int | None:
    total = 0
    for facts in inputs.adapters.values():
        if facts.info is None:
            return None
        for module in facts.info.modules:
            kernel = 1
            for k in module.kernel:
                kernel *= k
            total += 4 * module.rank * (module.in_features + module.out_features) * kernel
    return total


def estimate_memory(plan: Any, inputs: InputFacts) -> dict[str, Any]:
    """Estimated peak RSS in bytes per executor; None where the base is not available yet."""
    info = inputs.base_info
    lora = _lora_bytes(inputs)
    if info is None or lora is None:
        return {"diffusers": None, "streaming": None, "basis": "unknown until the inputs are fetched"}
    stored = info.dtype or "float32"
    load_dtype = plan.steps[0].dtype if plan.steps[0].dtype != "auto" else stored
    scale = _DTYPE_SIZE.get(load_dtype, 4) / _DTYPE_SIZE.get(stored, 4)
    pipeline = int(info.total_bytes * scale * 1.15) + 3 * lora + RUNTIME_OVERHEAD_BYTES
    largest_fp32 = info.largest_tensor_bytes * 4 // _DTYPE_SIZE.get(stored, 4)
    streaming = 3 * largest_fp32 + lora + RUNTIME_OVERHEAD_BYTES
    return {
        "diffusers": pipeline,
        "streaming": streaming,
        "basis": f"{info.total_bytes} bytes of base weights ({stored}), largest tensor "
        f"{info.largest_tensor_bytes} bytes, {lora} bytes of LoRA factors (fp32)",
    }
