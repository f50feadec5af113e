"""The building blocks of the recipe models: shared field types and the strict base model.

Names, variable names, numbers that are never booleans, finite floats, the base class every
``*Spec`` derives from (``extra="forbid"``, frozen). Plain pydantic, torch-free.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

__all__ = [
    "BLOCK_KEY",
    "HUB_ID",
    "NAME_PATTERN",
    "NO_BOOL",
    "SVD_CLAMP_MIN",
    "VAR_PATTERN",
    "FiniteFloat",
    "Integer",
    "Name",
    "Scalar",
    "SpecModel",
    "SvdDriver",
    "VarName",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
VAR_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
VarName = Annotated[str, StringConstraints(pattern=VAR_PATTERN)]
Scalar = str | bool | int | float
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
BLOCK_KEY = Annotated[str, StringConstraints(pattern=r"^block_[0-9]{1,3}$")]


def _not_a_boolean(value: Any) -> Any:
    """YAML ``true``/``false`` are booleans, never the numbers 1 and 0 (pydantic would convert them)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()} (a boolean)")
    return value


#: Numbers as a recipe writes them: ``weight: true`` or ``steps: false`` is an error, not 1 or 0. (The
#: validator comes after each type's own constraints, which then stay in the JSON Schema.)
NO_BOOL = BeforeValidator(_not_a_boolean)
Integer = Annotated[int, NO_BOOL]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, ge=-1e6, le=1e6), NO_BOOL]
SvdDriver = Literal["gesvd", "gesvdj", "gesvda"]  # torch.linalg.svd's cuSOLVER drivers (CUDA only)
SVD_CLAMP_MIN = 0.5  # PEFT's clamp quantile must lie above the median, see MergeSpec._clamp_above_the_median


class SpecModel(BaseModel):
    """Base of every recipe model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
