"""What a model family is, as data: the record every family module fills in (torch-free).

A family module (``sd``, ``flux1``, …) builds one :class:`Family` from tables — its pipeline classes
and LoRA-loadable components, its block groups for per-block weights, its original-layout module
table (single-file names, kohya/BFL LoRA names), its grid call conventions — and the rest of
lorarecipe reads those tables instead of branching on the family's name. Nothing here imports
torch, diffusers or the recipe package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Literal

__all__ = [
    "BlockGroup",
    "Family",
    "GridCall",
    "ModuleRule",
    "ParamRule",
    "SingleFileComponent",
    "Split",
    "Variant",
]


class Split(str, Enum):
    """How one original-layout weight's output rows are shared by the diffusers modules it holds."""

    WHOLE = "whole"  # one diffusers module, the same rows
    EQUAL = "equal"  # n modules of equal height, concatenated (a fused q/k/v projection)
    QKV_REST = "qkv_rest"  # q, k, v of height = in_features, then the rest (FLUX.1 single-block linear1)
    SWAP_HALVES = "swap_halves"  # one module whose two row halves are stored swapped (shift/scale)
    # SWAP_HALVES where the weight is twice as tall as wide (an AdaLayerNormContinuous: SD 3's last
    # context block, whose siblings are AdaLayerNormZero, 6× as tall, and stored as they are)
    SWAP_HALVES_IF_PAIR = "swap_halves_if_pair"


@dataclass(frozen=True)
class ModuleRule:
    """One module of the original (BFL/LDM) layout and the diffusers modules its weight is made of.

    ``original`` and ``diffusers`` are templates over the block index ``{i}``; ``split`` says how
    the original weight's rows are shared out (its columns are the same input for every part).
    """

    original: str
    diffusers: tuple[str, ...]
    split: Split = Split.WHOLE


@dataclass(frozen=True)
class ParamRule:
    """A parameter stored under another name in the original layout (e.g. a norm's ``scale``)."""

    original: str
    diffusers: str


@dataclass(frozen=True)
class BlockGroup:
    """A run of numbered blocks a recipe can weight per block (``double_blocks: {0-9: 0.5}``).

    ``name`` is the name users know (BFL/ComfyUI/kohya), ``module_prefix`` the diffusers module
    path of block ``i`` without the index, ``config_key`` the denoiser config entry holding the
    number of blocks.
    """

    name: str
    module_prefix: str
    config_key: str
    description: str


@dataclass(frozen=True)
class GridCall:
    """How a family's pipeline is called for one grid cell.

    ``attention_kwargs`` is the call argument that carries a LoRA ``scale``; ``negative_prompt`` is
    ``"native"`` (classifier-free guidance: always passed), ``"true_cfg"`` (guidance-distilled:
    passed only with ``true_cfg_scale`` > 1) or ``"none"`` (the pipeline takes no negative prompt);
    ``guidance`` says what the grid's ``guidance`` means and ``guidance_argument`` which call argument
    takes it (Qwen-Image's classifier-free guidance is ``true_cfg_scale``: its ``guidance_scale`` is for
    guidance-distilled variants only). ``frames``: a video family's default number of frames per grid
    cell (0: the family makes images).
    """

    attention_kwargs: Literal["cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs"]
    negative_prompt: Literal["native", "true_cfg", "none"]
    default_guidance: float
    guidance: str
    guidance_argument: Literal["guidance_scale", "true_cfg_scale"] = "guidance_scale"
    frames: int = 0


@dataclass(frozen=True)
class SingleFileComponent:
    """Where one component goes in the family's single-file checkpoint: a key prefix and a naming
    scheme (``unet``, ``vae``, ``hf_clip``, ``open_clip``: the LDM/SGM mappers; ``rules``: the
    family's :class:`ModuleRule` table)."""

    prefix: str
    scheme: Literal["unet", "vae", "hf_clip", "open_clip", "rules"]


@dataclass(frozen=True)
class Variant:
    """One model of a family, told apart by its denoiser's hidden width (FLUX.2 dev or Klein 4B/9B,
    Wan 1.3B/5B/14B), so that a LoRA made for a sibling is refused naming both models."""

    label: str
    width: int


@dataclass(frozen=True)
class Family:
    """A pipeline family, as every stage of lorarecipe needs it (see the module docstring)."""

    key: str
    label: str
    pipeline_class: str  # the class a single-file base or a built-in is loaded as
    pipeline_classes: tuple[str, ...]  # every model_index.json class that belongs to the family
    lora_mixin: str  # diffusers.loaders.lora_pipeline class that loads its LoRAs
    denoiser: Literal["unet", "transformer"]
    lora_components: tuple[str, ...]
    default_size: int
    grid: GridCall
    #: component -> place in the single-file checkpoint ({} = no single-file export)
    single_file_layout: MappingProxyType[str, SingleFileComponent] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    #: blocks a recipe weights per block on a transformer denoiser (UNet families use diffusers' own)
    block_groups: tuple[BlockGroup, ...] = ()
    #: original-layout modules of the denoiser (single-file names, kohya/BFL LoRA names)
    original_modules: tuple[ModuleRule, ...] = ()
    original_params: tuple[ParamRule, ...] = ()
    #: modules named only in LoRA files of other layouts (XLabs' ``processor.qkv_lora1``, …)
    lora_only_modules: tuple[ModuleRule, ...] = ()
    #: component -> kohya key prefix, for reading and writing kohya-layout LoRA files
    kohya_prefixes: MappingProxyType[str, str] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    #: lorarecipe converts LoRAs named in the original layout itself (diffusers' converter cannot)
    converts_original_loras: bool = False
    #: the original layout stores every module no rule names under its diffusers name (Qwen-Image's
    #: checkpoints are diffusers-named; Z-Image's differ only where a rule says)
    original_keeps_names: bool = False
    #: LoRA key layouts the family's diffusers loader converts besides ``<component>.`` PEFT keys and
    #: kohya ``lora_unet_`` names: ``diffusion_model`` (ai-toolkit/ComfyUI prefix), ``bare`` (module
    #: names without a prefix, read when the file has ``.alpha`` keys or PEFT's ``default.`` name),
    #: ``lokr`` (LyCORIS LoKr into PEFT LoKr layers, whose alpha convention differs: named in the
    #: message; lorarecipe applies LoKr itself)
    lora_layouts: frozenset[str] = frozenset()
    #: pipeline classes that need an input image (img2img, inpaint, edit models): built and fused, not
    #: rendered in grids (a grid calls the pipeline with prompts only)
    image_input_pipelines: tuple[str, ...] = ()
    #: what those pipelines do with the image, and what the model is called (the grid refusal's words)
    image_input_use: tuple[str, str] = ("edits an input image", "the edit model")
    #: name parts of modules only the image-conditioned models of the family have, in any LoRA layout
    #: (Wan I2V's image cross-attention): a LoRA adapting them on a base without them is refused, named
    image_modules: tuple[str, ...] = ()
    #: models of the family by denoiser width, named in mismatch errors
    variants: tuple[Variant, ...] = ()
    #: denoisers a LoRA file can be loaded into, one at a time (Wan 2.2 A14B's two experts:
    #: ``transformer`` for high noise, ``transformer_2`` for low noise; diffusers'
    #: ``load_into_transformer_2``); () when the family has one denoiser
    experts: tuple[str, ...] = ()
    #: LoRA files saved from a bare PEFT model (``base_model.model.`` + diffusers module names) load
    #: (diffusers' loader for this family converts them)
    reads_raw_peft: bool = False
    #: module names the denoiser's class keeps in float32 when diffusers loads it in half precision
    #: (``_keep_in_fp32_modules``: Wan's time embedder, norms and modulation), matched per dotted part
    keep_in_float32: tuple[str, ...] = ()
    #: families whose LoRAs this family's loader also reads (Chroma: FLUX.1's), checked module by module
    reads_loras_of: tuple[str, ...] = ()

    @property
    def single_file(self) -> bool:
        """Whether lorarecipe writes (and streams) this family's single-file checkpoint."""
        return bool(self.single_file_layout)

    @property
    def single_file_components(self) -> tuple[str, ...]:
        return tuple(self.single_file_layout)

    @property
    def denoisers(self) -> tuple[str, ...]:
        """The components that denoise: the experts, or the one denoiser."""
        return self.experts or (self.denoiser,)

    @property
    def unet_block_weights(self) -> bool:
        """Per-block weights are diffusers' UNet dicts (``{down: …, mid: …, up: …}``)."""
        return self.denoiser == "unet"
