"""The ``outputs`` section of a recipe: one pydantic model per output kind (a discriminated union).

Plain data -> validated, frozen models: a fused pipeline folder, a single file, a LoRA file, a grid
(with its sweep), each with an optional ``publish`` section. Paths are checked by the compiler.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from .fields import NAME_PATTERN, NO_BOOL, FiniteFloat, Integer, Name, SpecModel
from .vocabulary import RESERVED_VARIANTS, Expert, SaveDType

__all__ = [
    "GridOutput",
    "LoraOutput",
    "OutputSpec",
    "PipelineOutput",
    "PublishSpec",
    "SingleFileOutput",
    "SweepSpec",
]

RelPath = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class PublishSpec(SpecModel):
    """Where ``lorarecipe publish`` (or ``build --publish``) puts this output on the Hugging Face Hub.

    Not part of the plan's fingerprint: changing it never rebuilds anything. ``repo`` and
    ``commit_message`` may use the recipe's variables and ``{{ name }}`` (the recipe's name),
    ``{{ build }}`` (the matrix label) and ``{{ output }}`` (this output's name)."""

    repo: Annotated[str, StringConstraints(min_length=1, max_length=300)] = Field(
        ..., description="Hub model repo id 'namespace/name', e.g. 'myorg/{{ name }}-{{ output }}'."
    )
    private: bool = Field(True, description="Create the repo private (when it does not exist yet).")
    revision: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        "main", description="Branch to commit to."
    )
    create: bool = Field(True, description="Create the repo when it does not exist (else: an error).")
    commit_message: Annotated[str, StringConstraints(max_length=2000)] | None = Field(
        None, description="First line of the commit message (default: names the recipe and output)."
    )


class PipelineOutput(SpecModel):
    """The fused pipeline as a diffusers folder (safetensors only)."""

    kind: Literal["pipeline"]
    path: RelPath = Field(..., description="Folder, relative to the output root.")
    dtype: SaveDType | None = Field(None, description="Save dtype (default: the base dtype).")
    card: bool = Field(True, description="Write a README.md model card into the folder.")
    publish: PublishSpec | None = Field(None, description="Publish this output to the Hugging Face Hub.")


class SingleFileOutput(SpecModel):
    """The fused checkpoint as one .safetensors file in the family's original layout."""

    kind: Literal["single_file"]
    path: RelPath = Field(..., description="A .safetensors file, relative to the output root.")
    dtype: SaveDType | None = Field(None, description="Save dtype (default: the base dtype).")
    component: Expert | None = Field(
        None,
        description="Families with two denoisers (Wan 2.2 A14B): the expert this file holds, "
        "transformer (high noise) or transformer_2 (low noise); one file per expert, as the original "
        "checkpoints. Default: transformer.",
    )
    publish: PublishSpec | None = Field(None, description="Publish this output to the Hugging Face Hub.")

    @field_validator("path")
    @classmethod
    def _suffix(cls, value: str) -> str:
        if not value.endswith(".safetensors"):
            raise ValueError("a single-file checkpoint path must end with .safetensors")
        return value


class LoraOutput(SpecModel):
    """One adapter (usually a merge) saved as a LoRA file in a folder, with a model card."""

    kind: Literal["lora"]
    adapter: Name = Field(..., description="The adapter or merge to save.")
    path: RelPath = Field(..., description="Folder, relative to the output root.")
    layout: Literal["diffusers", "kohya"] = Field(
        "diffusers",
        description="Key layout: diffusers (with lora_adapter_metadata) or kohya (ComfyUI/A1111).",
    )
    weight_name: str | None = Field(
        None,
        description="File name (default pytorch_lora_weights.safetensors "
        "for diffusers, <adapter>.safetensors for kohya).",
    )
    dtype: SaveDType | None = Field(None, description="Save dtype (default: as computed).")
    component: Expert | None = Field(
        None,
        description="Families with two denoisers (Wan 2.2 A14B): the expert whose layers the file "
        "holds (a LoRA file is loaded into one expert at a time). Default: the adapter's only expert.",
    )
    card: bool = Field(True, description="Write a README.md model card into the folder.")
    publish: PublishSpec | None = Field(None, description="Publish this output to the Hugging Face Hub.")

    @field_validator("weight_name")
    @classmethod
    def _weight_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.endswith(".safetensors") or "/" in value or "\\" in value):
            raise ValueError("weight_name must be a plain file name ending with .safetensors")
        return value


class SweepSpec(SpecModel):
    """An extra grid axis: one adapter's weight, or the fuse lora_scale."""

    adapter: Name | None = Field(None, description="Adapter whose weight is swept (others keep the mix).")
    weights: list[FiniteFloat] | None = Field(None, min_length=1, max_length=16)
    lora_scale: list[FiniteFloat] | None = Field(
        None, min_length=1, max_length=16, description="lora_scale values for the mix."
    )

    @model_validator(mode="after")
    def _one_axis(self) -> SweepSpec:
        if (self.adapter is None) != (self.weights is None):
            raise ValueError("a weight sweep needs both 'adapter' and 'weights'")
        if (self.weights is None) == (self.lora_scale is None):
            raise ValueError("sweep either an adapter's 'weights' or 'lora_scale', exactly one")
        return self


class GridOutput(SpecModel):
    """A labelled PNG grid: rows prompt × seed, columns the variants (× the sweep)."""

    kind: Literal["grid"]
    path: RelPath = Field(..., description="A .png file, relative to the output root.")
    prompts: list[Annotated[str, StringConstraints(max_length=1000)]] = Field(
        ..., min_length=1, max_length=64
    )
    negative_prompt: str = Field("", max_length=1000)
    seeds: list[Annotated[int, Field(ge=0, le=2**63 - 1), NO_BOOL]] = Field(
        default_factory=lambda: [0], min_length=1, max_length=64
    )
    steps: Annotated[int, Field(ge=1, le=500), NO_BOOL] = 20
    guidance: FiniteFloat | None = Field(
        None,
        description="guidance_scale: classifier-free guidance for SD (default 7.5); FLUX.1's distilled "
        "guidance embedding (default 3.5; schnell ignores it).",
    )
    true_cfg_scale: Annotated[float, Field(allow_inf_nan=False, gt=1.0, le=1e6), NO_BOOL] | None = Field(
        None,
        description="FLUX.1 only: true classifier-free guidance with negative_prompt (two passes per "
        "step). Guidance-distilled FLUX.1 takes no negative prompt without it.",
    )
    size: Integer | list[Integer] | None = Field(
        None, description="Image size: N or [width, height] (default: the family's native size)."
    )
    frames: Annotated[int, Field(ge=1, le=257), NO_BOOL] | None = Field(
        None,
        description="Video families (Wan): frames per cell, 4k+1 (default 81; 9 on the built-in models). "
        "Each cell is an animated WebP; the grid shows its frames as a strip.",
    )
    variants: list[str] = Field(
        default_factory=lambda: ["base", "mix"],
        min_length=1,
        max_length=32,
        description="Columns: 'base', 'mix', 'fused', or adapter/merge names.",
    )
    sweep: SweepSpec | None = None
    threads: int = Field(
        1,
        ge=1,
        le=256,
        description="torch intra-op threads while rendering (the setting is restored afterwards). A "
        "fixed count makes CPU images byte-identical on any machine (results depend on how sums are "
        "split between threads); 1 is fastest for the built-in tiny models, raise it for real models "
        "on CPU. No effect on GPU kernels.",
    )
    trigger_words: bool = Field(
        True, description="Prefix each prompt with the trigger words of the adapters active in the cell."
    )
    compile: Literal["none", "regional"] | None = Field(
        None,
        description="'regional': render through a copy of the denoiser whose repeated blocks are "
        "compiled once per worker (torch.compile), each variant's weights copied into it; 'none': eager. "
        "Default: the build's --compile. An execution choice (like --device): not part of the plan's "
        "fingerprint; the manifest records it.",
    )
    publish: PublishSpec | None = Field(None, description="Publish this output to the Hugging Face Hub.")

    @field_validator("path")
    @classmethod
    def _suffix(cls, value: str) -> str:
        if not value.endswith(".png"):
            raise ValueError("a grid path must end with .png")
        return value

    @field_validator("frames")
    @classmethod
    def _frames(cls, value: int | None) -> int | None:
        if value is not None and value % 4 != 1:
            raise ValueError(
                f"frames {value} must be 4k+1 (Wan's VAE compresses 4 frames into one): e.g. 5, 9, 81"
            )
        return value

    @field_validator("size")
    @classmethod
    def _size(cls, value: int | list[int] | None) -> int | list[int] | None:
        sizes = [value] if isinstance(value, int) else (value or [])
        if isinstance(value, list) and len(value) != 2:
            raise ValueError("size is N or [width, height]")
        for s in sizes:
            if not 8 <= s <= 4096 or s % 8:
                raise ValueError(f"image size {s} must be a multiple of 8 between 8 and 4096")
        return value

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: list[str]) -> list[str]:
        for v in value:
            if v not in RESERVED_VARIANTS and not re.match(NAME_PATTERN, v):
                raise ValueError(f"{v!r} is not a variant name")
        if len(set(value)) != len(value):
            raise ValueError("a variant is listed twice")
        return value


OutputSpec = Annotated[
    PipelineOutput | SingleFileOutput | LoraOutput | GridOutput, Field(discriminator="kind")
]
