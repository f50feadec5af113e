"""The recipe schema: pydantic v2 models of what the user writes (``*Spec``).

Plain data -> validated, frozen models. Unknown keys are errors (``extra="forbid"``), validators
raise ``ValueError`` with a fix-it message, and every field is documented once, in
``Field(description=…)``, from which ``schemas/recipe.schema.json`` is generated. Cross-references
between sections (an adapter named in a merge, …) are checked by the compiler, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from ..builtin.catalog import BUILTIN_BASES, BUILTIN_LORAS
from ..diagnostics import did_you_mean
from .vocabulary import (
    COMBINATION_TYPES,
    CombinationType,
    Component,
    DType,
    Expert,
    Family,
)

__all__ = [
    "AdapterSpec",
    "BaseSpec",
    "ComponentWeights",
    "FuseSpec",
    "GridOutput",
    "LoraOutput",
    "MergeSpec",
    "OutputSpec",
    "PipelineOutput",
    "PublishSpec",
    "Recipe",
    "SetAdaptersSpec",
    "SingleFileOutput",
    "SweepSpec",
    "UnetBlockWeights",
]
from .fields import (
    BLOCK_KEY,
    HUB_ID,
    NO_BOOL,
    SVD_CLAMP_MIN,
    FiniteFloat,
    Name,
    Scalar,
    SpecModel,
    SvdDriver,
    VarName,
)
from .output_models import (
    GridOutput,
    LoraOutput,
    OutputSpec,
    PipelineOutput,
    PublishSpec,
    SingleFileOutput,
    SweepSpec,
)


def _builtin_shorthand(value: Any) -> Any:
    """``"builtin:tiny-sd"`` -> ``{"builtin": "tiny-sd"}`` (the short form the README shows)."""
    if isinstance(value, str):
        if value.startswith("builtin:"):
            return {"builtin": value[len("builtin:") :]}
        raise ValueError(
            f"a source must be a mapping (hub/path/file/builtin), or 'builtin:NAME'; got {value!r}"
        )
    return value


def _check_hub_id(value: str | None) -> str | None:
    if value is not None and not HUB_ID.match(value):
        raise ValueError(f"{value!r} is not a Hugging Face repo id (expected 'org/name')")
    return value


class _SourceSpec(SpecModel):
    """Shared rules of base and adapter sources: the ``builtin:NAME`` short form, hub repo ids and
    known built-in names (``_builtins`` of the subclass)."""

    _builtins: ClassVar[Mapping[str, object]] = {}

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _builtin_shorthand(value)

    @field_validator("hub", check_fields=False)
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        return _check_hub_id(value)

    @field_validator("builtin", check_fields=False)
    @classmethod
    def _known_builtin(cls, value: str | None) -> str | None:
        if value is not None and value not in cls._builtins:
            kind = "base" if cls._builtins is BUILTIN_BASES else "LoRA"
            hint = did_you_mean(value, cls._builtins) or f"one of {', '.join(cls._builtins)}"
            raise ValueError(f"unknown builtin {kind} {value!r} ({hint})")
        return value


class BaseSpec(_SourceSpec):
    """The base model: exactly one of ``hub``, ``path``, ``file`` or ``builtin``."""

    _builtins: ClassVar[Mapping[str, object]] = BUILTIN_BASES

    hub: str | None = Field(
        None,
        description="Hugging Face Hub repo id of a diffusers pipeline, e.g. "
        "'stabilityai/stable-diffusion-xl-base-1.0'.",
    )
    revision: str | None = Field(
        None,
        description="Hub branch, tag or commit (pin a 40-hex commit, or "
        "run `lorarecipe lock`). Default: main.",
    )
    path: str | None = Field(None, description="Local diffusers pipeline folder, relative to the recipe.")
    file: str | None = Field(
        None,
        description="Local single-file checkpoint (.safetensors), relative to "
        "the recipe; loaded with from_single_file.",
    )
    builtin: str | None = Field(None, description=f"A built-in tiny pipeline: {', '.join(BUILTIN_BASES)}.")
    config: str | None = Field(
        None,
        description="For `file`: a local diffusers folder (or cached hub id) "
        "holding the pipeline configs, so single files load offline.",
    )
    family: Family = Field("auto", description="Pipeline family; detected from the files when 'auto'.")
    dtype: DType = Field(
        "auto",
        description="Load dtype; 'auto' keeps the stored dtype (an fp16 base is never silently upcast).",
    )
    variant: str | None = Field(None, description="diffusers weight variant, e.g. 'fp16'.")

    @model_validator(mode="after")
    def _one_source(self) -> BaseSpec:
        given = [k for k in ("hub", "path", "file", "builtin") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of hub, path, file or builtin"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.revision is not None and self.hub is None:
            raise ValueError("'revision' only applies to a hub base")
        if self.config is not None and self.file is None:
            raise ValueError("'config' only applies to a single-file base ('file')")
        return self


class AdapterSpec(_SourceSpec):
    """One LoRA file: from the hub (repo + explicit weight_name), a local file, or a built-in; or a
    checkpoint whose difference from the base is the adapter (for ``extract`` merges)."""

    _builtins: ClassVar[Mapping[str, object]] = BUILTIN_LORAS

    hub: str | None = Field(None, description="Hub repo id holding the LoRA.")
    weight_name: str | None = Field(
        None,
        description="File inside the hub repo (required: lorarecipe "
        "never lets diffusers guess among several files).",
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit. Default: main.")
    file: str | None = Field(None, description="Local .safetensors file, relative to the recipe.")
    builtin: str | None = Field(None, description=f"A built-in tiny LoRA: {', '.join(BUILTIN_LORAS)}.")
    checkpoint: str | None = Field(
        None,
        description="A fused or fine-tuned checkpoint of the base's family (local diffusers folder, relative "
        "to the recipe): the adapter is its weights minus the base's. Only an input of 'extract' merges.",
    )
    format: Literal["auto", "diffusers", "peft", "kohya"] = Field(
        "auto",
        description="Key layout of the file; 'auto' detects it from the safetensors header "
        "('peft' is the same layout as 'diffusers').",
    )
    scale_convention: Literal["lycoris", "peft"] | None = Field(
        None,
        description="LyCORIS LoKr files: how alpha/rank applies. 'lycoris' (kohya, LyCORIS, ai-toolkit, "
        "ComfyUI): alpha/rank only when a Kronecker factor is stored decomposed, else 1; 'peft' (PEFT's "
        "LoKrModel): always alpha/rank. Default: what the file's trainer meant (detected from its keys).",
    )
    trigger_words: list[Annotated[str, StringConstraints(max_length=200)]] = Field(
        default_factory=list,
        max_length=32,
        description="Words that activate the LoRA; used in grids and cards.",
    )
    description: str | None = Field(None, max_length=2000, description="Free text for the model card.")
    load_into: list[Expert] | None = Field(
        None,
        min_length=1,
        max_length=2,
        description="Families with two denoisers (Wan 2.2 A14B): the experts this LoRA file is loaded "
        "into, as diffusers' load_lora_weights(load_into_transformer_2=...): transformer (high-noise "
        "steps), transformer_2 (low-noise steps), or both. Required when the base has two experts.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> AdapterSpec:
        given = [k for k in ("hub", "file", "builtin", "checkpoint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of hub, file, builtin or checkpoint"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.checkpoint is not None and (self.format != "auto" or self.scale_convention is not None):
            raise ValueError("'format'/'scale_convention' describe adapter files, not a checkpoint")
        if self.hub is not None and not self.weight_name:
            raise ValueError("a hub adapter needs 'weight_name': the exact .safetensors file to load")
        if self.weight_name is not None and self.hub is None:
            raise ValueError("'weight_name' only applies to a hub adapter")
        if self.revision is not None and self.hub is None:
            raise ValueError("'revision' only applies to a hub adapter")
        if self.load_into is not None and len(set(self.load_into)) != len(self.load_into):
            raise ValueError("'load_into' lists an expert twice")
        return self


class UnetBlockWeights(SpecModel):
    """Per-block UNet weights as diffusers accepts them (attention layers only)."""

    down: FiniteFloat | dict[BLOCK_KEY, FiniteFloat | list[FiniteFloat]] | None = Field(
        None, description="Weight of all down blocks, or per block: {block_1: 0.5} / {block_1: [0.5, 1.0]}."
    )
    mid: FiniteFloat | None = Field(None, description="Weight of the mid block.")
    up: FiniteFloat | dict[BLOCK_KEY, FiniteFloat | list[FiniteFloat]] | None = Field(
        None, description="Weight of all up blocks, or per block."
    )


BlockRangeKey = Annotated[int, Field(ge=0, le=9999)] | Annotated[str, StringConstraints(max_length=16)]
#: Per-block transformer weights: group -> weight, or group -> {block index or 'lo-hi' range: weight}.
TransformerBlockWeights = dict[
    Annotated[str, StringConstraints(max_length=64)], FiniteFloat | dict[BlockRangeKey, FiniteFloat]
]


class ComponentWeights(SpecModel):
    """Per-component weights of one adapter (diffusers' weight-dict form)."""

    unet: FiniteFloat | UnetBlockWeights | None = None
    transformer: FiniteFloat | TransformerBlockWeights | None = Field(
        None,
        description="A number, or per-block weights by the family's block names (lorarecipe's own: "
        "diffusers has none for transformers), e.g. FLUX.1 {double_blocks: {0-9: 0.5}, "
        "single_blocks: 1.0, default: 1.0}: one weight per group or per block index / inclusive "
        "range; blocks not listed and modules outside blocks take 'default' (1.0).",
    )
    transformer_2: FiniteFloat | TransformerBlockWeights | None = Field(
        None,
        description="Wan 2.2 A14B's second (low-noise) expert: a number or per-block weights, as for "
        "'transformer' (the high-noise expert).",
    )
    text_encoder: FiniteFloat | None = Field(
        None, description="A number (diffusers silently ignores a dict here, so lorarecipe refuses it)."
    )
    text_encoder_2: FiniteFloat | None = None
    text_encoder_3: FiniteFloat | None = None


Weight = FiniteFloat | ComponentWeights


class _AdapterWeights(SpecModel):
    """Shared form: ``adapters: [a, b]`` with ``weights: [...]``, or ``adapters: {a: 0.7, b: 0.8}``."""

    adapters: list[Name] | dict[Name, Any] = Field(
        ..., description="Adapter (or merge) names, or a mapping name -> weight."
    )

    def pairs(self) -> list[tuple[str, Any]]:
        """(name, weight) pairs, weights defaulting to 1.0."""
        if isinstance(self.adapters, dict):
            return list(self.adapters.items())
        weights = getattr(self, "weights", None)
        if weights is None:
            return [(name, 1.0) for name in self.adapters]
        if not isinstance(weights, list):
            return [(name, weights) for name in self.adapters]
        return list(zip(self.adapters, weights, strict=True))

    def _check_shape(self) -> None:
        weights = getattr(self, "weights", None)
        if isinstance(self.adapters, dict):
            if weights is not None:
                raise ValueError("give weights either in the 'adapters' mapping or in 'weights', not both")
            if not self.adapters:
                raise ValueError("'adapters' is empty")
        else:
            if not self.adapters:
                raise ValueError("'adapters' is empty")
            if len(set(self.adapters)) != len(self.adapters):
                raise ValueError("'adapters' lists a name twice")
            if isinstance(weights, list) and len(weights) != len(self.adapters):
                raise ValueError(
                    f"{len(weights)} weights for {len(self.adapters)} adapters: give one weight per adapter"
                )


class MergeSpec(_AdapterWeights):
    """A merge creating a new adapter named by its key: PEFT ``add_weighted_adapter``, or ``extract``."""

    method: CombinationType = Field(
        ...,
        description="PEFT combination_type ("
        + ", ".join(k for k, r in COMBINATION_TYPES.items() if r.peft)
        + "), or 'extract': any adapters (LoRA, LyCORIS, DoRA, merges) turned into a plain LoRA by SVD.",
    )
    adapters: list[Name] | dict[Name, FiniteFloat] = Field(
        ..., description="Adapters to merge, or name -> weight."
    )
    weights: list[FiniteFloat] | None = Field(None, description="One weight per adapter (default 1.0).")
    density: Annotated[float, Field(gt=0.0, le=1.0), NO_BOOL] | None = Field(
        None,
        description="Fraction kept (ties, dare_*, magnitude_prune and their _svd forms).",
    )
    majority_sign_method: Literal["total", "frequency"] | None = Field(
        None, description="Sign election for ties / dare_ties (+ _svd). PEFT default: total."
    )
    svd_rank: Annotated[int, Field(ge=1, le=4096), NO_BOOL] | None = Field(
        None,
        description="Rank of *_svd results (default: max rank); required by 'extract' (its largest rank).",
    )
    svd_energy: Annotated[float, Field(gt=0.0, le=1.0), NO_BOOL] | None = Field(
        None,
        description="'extract' only: per-module rank, the fewest singular values holding this fraction of "
        "the module's squared Frobenius norm (e.g. 0.99), at most svd_rank.",
    )
    svd_clamp: (
        Annotated[float, Field(le=1.0, json_schema_extra={"exclusiveMinimum": SVD_CLAMP_MIN}), NO_BOOL] | None
    ) = Field(
        None,
        description="Quantile clamp of SVD results: both factors are clamped to ±(this quantile of their "
        "entries), e.g. 0.99. Must be above 0.5: at or below the median the quantile is ≤ 0 and every "
        "entry becomes one constant.",
    )
    svd_full_matrices: bool = Field(True, description="torch.linalg.svd full_matrices (False is faster).")
    svd_driver: SvdDriver | None = Field(
        None,
        description="torch.linalg.svd driver for svd methods (cuSOLVER: gesvd, gesvdj, gesvda). Only on "
        "CUDA builds; default: torch's choice.",
    )
    seed: Annotated[int, Field(ge=0, le=2**63 - 1), NO_BOOL] = Field(
        0, description="Seed of torch's RNG before the merge (DARE draws)."
    )
    components: list[Component] | None = Field(None, description="Components to merge (default: all).")

    @model_validator(mode="after")
    def _rules(self) -> MergeSpec:
        self._check_shape()
        rule = COMBINATION_TYPES[self.method]
        if rule.density and self.density is None:
            raise ValueError(
                f"method {self.method!r} needs 'density' (the fraction of values kept, e.g. 0.5)"
            )
        if not rule.density and self.density is not None:
            raise ValueError(f"'density' has no effect with method {self.method!r}")
        if not rule.majority_sign and self.majority_sign_method is not None:
            raise ValueError(f"'majority_sign_method' has no effect with method {self.method!r}")
        if not rule.svd and (
            self.svd_rank is not None or self.svd_clamp is not None or self.svd_driver is not None
        ):
            raise ValueError(
                f"'svd_rank'/'svd_clamp'/'svd_driver' only apply to svd methods, not {self.method!r}"
            )
        if self.method == "extract":
            if self.svd_rank is None:
                raise ValueError(
                    "method 'extract' needs 'svd_rank', the rank of the LoRA it writes (an SVD truncated to "
                    "that rank; 'svd_energy' can lower it per module)"
                )
            set_here = self.model_fields_set
            if self.svd_driver is not None or "svd_full_matrices" in set_here:
                raise ValueError(
                    "'svd_driver'/'svd_full_matrices' are PEFT options; 'extract' does not use them"
                )
        elif self.svd_energy is not None:
            raise ValueError(f"'svd_energy' only applies to method 'extract', not {self.method!r}")
        return self

    @field_validator("svd_clamp")
    @classmethod
    def _clamp_above_the_median(cls, value: float | None) -> float | None:
        """PEFT clamps U·S and Vh to [-q, q] with q = quantile(entries, svd_clamp)
        (``_svd_generalized_task_arithmetic_weighted_adapter``). SVD factors carry arbitrary signs per
        singular pair, so their entries are balanced around 0: at or below the median q ≤ 0, and
        ``clamp(min=-q, max=q)`` with min ≥ max sets every entry to q — the adapter is destroyed."""
        if value is not None and value <= SVD_CLAMP_MIN:
            raise ValueError(
                f"svd_clamp {value} cannot work: PEFT clamps the SVD factors to ±(the {value} quantile of "
                "their entries), which is ≤ 0 at or below 0.5 (the factors' entries are balanced around "
                "0), and then sets every entry to one constant; use a value above 0.5, typically 0.99"
            )
        return value


class SetAdaptersSpec(_AdapterWeights):
    """``pipe.set_adapters(adapters, adapter_weights=weights)``: the runtime mix."""

    adapters: list[Name] | dict[Name, Weight] = Field(..., description="Active adapters, or name -> weight.")
    weights: Weight | list[Weight] | None = Field(
        None, description="One weight (number or per-component/per-block dict) per adapter, or one for all."
    )

    @model_validator(mode="after")
    def _rules(self) -> SetAdaptersSpec:
        self._check_shape()
        return self


class FuseSpec(SpecModel):
    """``pipe.fuse_lora(adapter_names, lora_scale, components)`` into the base weights."""

    adapters: list[Name] | None = Field(None, description="Adapters to fuse (default: the set_adapters mix).")
    lora_scale: FiniteFloat = Field(1.0, description="Global multiplier of every fused delta.")
    components: list[Component] | None = Field(None, description="Components to fuse (default: all).")

    @model_validator(mode="after")
    def _rules(self) -> FuseSpec:
        if self.adapters is not None and not self.adapters:
            raise ValueError("'adapters' is empty: nothing to fuse")
        if self.components is not None and not self.components:
            raise ValueError("'components' is empty: nothing to fuse")
        return self


class Recipe(SpecModel):
    """A lorarecipe merge recipe (YAML kept in git)."""

    version: Literal[1] = Field(1, description="Recipe format version.")
    name: Name | None = Field(None, description="Recipe name (default: the file name without .yaml).")
    description: str | None = Field(None, max_length=5000)
    license: str | None = Field(
        None, max_length=100, description="License id for model cards, e.g. 'openrail++'."
    )
    variables: dict[VarName, Scalar] = Field(
        default_factory=dict,
        max_length=64,
        description=("Values usable as {{ name }} in any string; overridable with --set name=value."),
    )
    matrix: dict[VarName, list[Scalar]] = Field(
        default_factory=dict,
        max_length=8,
        description=("Variables to sweep: one build per combination, each in its own folder."),
    )
    base: BaseSpec
    adapters: dict[Name, AdapterSpec] = Field(..., min_length=1, max_length=64)
    merges: dict[Name, MergeSpec] = Field(
        default_factory=dict, max_length=64, description="New adapters made with add_weighted_adapter."
    )
    set_adapters: SetAdaptersSpec | None = Field(None, description="The runtime mix (set_adapters).")
    fuse: FuseSpec | None = Field(None, description="Bake adapters into the base weights (fuse_lora).")
    outputs: dict[Name, OutputSpec] = Field(..., min_length=1, max_length=64)
