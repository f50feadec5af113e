"""The closed vocabularies of a recipe, as literal registries (no import-time magic).

Everything here is data: merge methods (PEFT's combination types and the rules PEFT applies to them,
and lorarecipe's own ``extract``), pipeline
families (re-exported from :mod:`lorarecipe.families`, where each family is a module of tables),
LoRA-loadable components, dtypes, and the reserved grid-variant names. The recipe
schema, the compiler and the runner all read these tables, so a rule lives in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

from ..families import FAMILIES as FAMILY_REGISTRY
from ..families import Family as FamilyInfo

__all__ = [
    "COMBINATION_TYPES",
    "COMPONENTS",
    "DTYPES",
    "FAMILIES",
    "RESERVED_VARIANTS",
    "CombinationRule",
    "FamilyInfo",
    "ValueEnum",
    "lone_adapter_merge_is_exact",
]


class ValueEnum(str, Enum):
    """A closed set of strings as an enum that prints, formats and serializes as its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


@dataclass(frozen=True)
class CombinationRule:
    """What a merge method requires: PEFT's ``add_weighted_adapter`` rules for one ``combination_type``,
    or lorarecipe's own method (``peft`` False)."""

    equal_ranks: bool  # PEFT raises "All adapters must have the same r value" otherwise
    density: bool  # density is required (PEFT crashes with a TypeError without it)
    majority_sign: bool  # majority_sign_method is meaningful
    svd: bool  # the result is re-factored by SVD (svd_rank, svd_clamp apply)
    random: bool  # draws from torch's global RNG (DARE): needs a seed
    description: str
    peft: bool = True  # run by PEFT's add_weighted_adapter (which merges only LoRAs)


COMBINATION_TYPES: dict[str, CombinationRule] = {
    "linear": CombinationRule(
        True, False, False, False, False, "weighted sum of the A and B factors separately (equal ranks)"
    ),
    "cat": CombinationRule(
        False,
        False,
        False,
        False,
        False,
        "concatenation of the factors: exact weighted sum of deltas, rank = sum of ranks",
    ),
    "svd": CombinationRule(
        False, False, False, True, False, "weighted sum of deltas re-factored by SVD to svd_rank"
    ),
    "ties": CombinationRule(
        True, True, True, False, False, "TIES: trim to density, elect signs, disjoint mean (equal ranks)"
    ),
    "ties_svd": CombinationRule(False, True, True, True, False, "TIES on deltas, re-factored by SVD"),
    "dare_linear": CombinationRule(
        True, True, False, False, True, "DARE: random drop to density and rescale, then linear (equal ranks)"
    ),
    "dare_ties": CombinationRule(
        True, True, True, False, True, "DARE drop, then TIES sign election (equal ranks)"
    ),
    "dare_linear_svd": CombinationRule(
        False, True, False, True, True, "DARE linear on deltas, SVD re-factored"
    ),
    "dare_ties_svd": CombinationRule(False, True, True, True, True, "DARE TIES on deltas, SVD re-factored"),
    "magnitude_prune": CombinationRule(
        True,
        True,
        False,
        False,
        False,
        "keep the largest-magnitude fraction (density), then sum (equal ranks)",
    ),
    "magnitude_prune_svd": CombinationRule(
        False, True, False, True, False, "magnitude prune on deltas, SVD re-factored"
    ),
    "extract": CombinationRule(
        False,
        False,
        False,
        True,
        False,
        "each module's weighted sum of deltas (LoRA, LoHa, LoKr, DoRA, merges, checkpoint differences) "
        "re-factored by truncated SVD into a plain LoRA of rank svd_rank (lorarecipe's own, like kohya's "
        "svd_merge_lora)",
        peft=False,
    ),
}


def lone_adapter_merge_is_exact(
    method: str, svd_rank: int | None, svd_clamp: float | None, rank: int
) -> bool:
    """Whether PEFT's merge of a *single* adapter (of LoRA rank ``rank``) computes what ``method`` asks.

    PEFT's ``_check_add_weighted_adapter`` switches to ``linear`` when given one adapter: the result is
    w·ΔW at the adapter's rank. That is the method's own result for ``linear`` and ``cat``, and for
    ``svd`` when nothing truncates or clamps (an SVD of a rank-r matrix kept to ≥ r singular values is
    the matrix). Every density method (TIES trims, DARE drops, magnitude pruning prunes) and a
    truncating or clamping SVD would compute something else: their parameters would be ignored.
    """
    if method in ("linear", "cat"):
        return True
    if method == "svd":
        return svd_clamp is None and (svd_rank is None or svd_rank >= rank)
    return False


CombinationType = Literal[
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
    "extract",
]


#: Pipeline families: the registry of :mod:`lorarecipe.families` (one module of tables per family).
FAMILIES = FAMILY_REGISTRY

Family = Literal[
    "auto", "sd1", "sd2", "sdxl", "sd3", "flux", "flux2", "qwen_image", "z_image", "wan", "chroma"
]

COMPONENTS: tuple[str, ...] = (
    "unet",
    "transformer",
    "transformer_2",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
)
Component = Literal[
    "unet", "transformer", "transformer_2", "text_encoder", "text_encoder_2", "text_encoder_3"
]
#: The denoisers of a family with two experts (Wan 2.2 A14B: high noise, low noise).
Expert = Literal["transformer", "transformer_2"]

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
DType = Literal["auto", "float32", "float16", "bfloat16"]
SaveDType = Literal["float32", "float16", "bfloat16"]

#: Grid variants that are not adapter names.
RESERVED_VARIANTS: dict[str, str] = {
    "base": "the base model with LoRA disabled",
    "mix": "the set_adapters mix",
    "fused": "the fused checkpoint",
}
