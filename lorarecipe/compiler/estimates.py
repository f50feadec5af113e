"""Peak-memory estimates of each executor, from header sizes alone (shown by ``lorarecipe plan``).

Plan + input facts -> {executor: bytes or None}. The diffusers route holds the whole pipeline; the
streaming fuser holds the LoRA factors and, for float32 outputs, a few copies of the largest weight
a LoRA targets (half-precision outputs are fused in ~4 MiB row chunks). The constants were fitted
to ``benchmarks/fuse.py`` on full-size SD1.5 and SDXL (README table): predictions within ~10 % of
the measured peak RSS. They are estimates for planning, not guarantees.
"""

from __future__ import annotations

from typing import Any

from ..families import get_family
from ..families.original_names import match_lora_module, split_heights
from .inputs import InputFacts

__all__ = ["RUNTIME_OVERHEAD_BYTES", "estimate_memory"]

#: RSS after importing torch + diffusers + transformers + peft (measured 381-388 MB).
RUNTIME_OVERHEAD_BYTES = 400 * 1024**2
#: What the diffusers route holds beyond the weights (pipeline objects, save buffers).
PIPELINE_EXTRA_BYTES = 256 * 1024**2
#: Working set of a half-precision streamed output (chunked fp32 accumulation).
CHUNK_BYTES = 32 * 1024**2
_DTYPE_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _lora_sizes(inputs: InputFacts) -> tuple[int, int] | None:
    """(bytes of all LoRA factors in fp32, fp32 bytes of the largest weight a LoRA targets). A fused
    original-layout module (FLUX.1 qkv, linear1) is held as one LoRA per diffusers part, each with
    its own copy of the down factor."""
    family = get_family(inputs.family)
    total = largest = 0
    for facts in inputs.adapters.values():
        if facts.difference is not None:
            continue  # read weight by weight by an extract merge (pipeline route), not held
        if facts.info is None:
            return None
        for module in facts.info.modules:
            kernel = 1
            for k in module.kernel:
                kernel *= k
            parts, tallest = 1, module.out_features
            found = (
                match_lora_module(family, module.name)
                if family is not None and family.original_modules
                else None
            )
            if found is not None and len(found.diffusers) > 1:
                heights = split_heights(
                    found.split, len(found.diffusers), module.in_features, module.out_features
                )
                parts, tallest = len(found.diffusers), max(heights or (module.out_features,))
            total += 4 * module.rank * (module.in_features * parts + module.out_features) * kernel
            largest = max(largest, 4 * module.in_features * tallest * kernel)
    return total, largest


def estimate_memory(plan: Any, inputs: InputFacts) -> dict[str, Any]:
    """Estimated peak RSS in bytes per executor; None where the inputs are not available yet."""
    info = inputs.base_info
    sizes = _lora_sizes(inputs)
    if info is None or sizes is None:
        return {"diffusers": None, "streaming": None, "basis": "unknown until the inputs are fetched"}
    lora, largest_target = sizes
    stored = info.dtype or "float32"
    load_dtype = plan.steps[0].dtype if plan.steps[0].dtype != "auto" else stored
    scale = _DTYPE_SIZE.get(load_dtype, 4) / _DTYPE_SIZE.get(stored, 4)
    pipeline = int(info.total_bytes * scale) + lora + RUNTIME_OVERHEAD_BYTES + PIPELINE_EXTRA_BYTES
    working = 4 * largest_target if load_dtype == "float32" else CHUNK_BYTES
    streaming = RUNTIME_OVERHEAD_BYTES + lora + working
    return {
        "diffusers": pipeline,
        "streaming": streaming,
        "basis": f"{info.total_bytes} bytes of base weights ({stored}), {lora} bytes of LoRA factors (fp32), "
        f"largest LoRA-targeted weight {largest_target} bytes (fp32)",
    }
