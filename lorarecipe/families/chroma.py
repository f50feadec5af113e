"""Chroma (Chroma1-HD, Chroma1-Base): FLUX.1-schnell's transformer pruned of its modulation, as tables.

- ``ORIGINAL_MODULES``: FLUX.1's BFL layout without the modules Chroma removed (per-block
  ``img_mod``/``txt_mod``/``modulation``, the time/vector/guidance embedders and the final adaLN: their
  shifts and scales come from one small MLP instead), plus that MLP, ``distilled_guidance_layer``
  (``in_proj``, ``layers.N.in_layer``/``out_layer``, ``norms.N.scale``, ``out_proj``) — the inverse of
  diffusers' ``convert_chroma_transformer_checkpoint_to_diffusers``. One table serves the single-file
  export and LoRAs in the original names.
- LoRAs: diffusers loads Chroma's through FLUX.1's ``FluxLoraLoaderMixin`` (into the transformer; the
  text encoder is T5 alone), so a FLUX.1 LoRA is read on a Chroma base (``reads_loras_of``) when every
  module it adapts exists in Chroma: an attention/MLP LoRA fits, one on the modulation or FLUX.1's CLIP
  encoder is refused naming the modules Chroma lacks (diffusers would drop or fail on them).
- ``BLOCK_GROUPS``: FLUX.1's ``double_blocks`` (19) and ``single_blocks`` (38).
- ``GRID``: classifier-free guidance with a negative prompt (``guidance_scale``, diffusers' default
  5.0), LoRA scale through ``joint_attention_kwargs``. Img2img and inpaint pipelines take an input
  image: built and fused, not rendered in grids.
"""

from __future__ import annotations

from types import MappingProxyType

from .flux1 import BLOCK_GROUPS, XLABS_MODULES
from .flux1 import ORIGINAL_MODULES as FLUX1_MODULES
from .flux1 import ORIGINAL_PARAMS as FLUX1_PARAMS
from .spec import Family, GridCall, ModuleRule, ParamRule, SingleFileComponent

__all__ = ["CHROMA", "ORIGINAL_MODULES", "ORIGINAL_PARAMS"]

# FLUX.1 modules Chroma has not: modulation and embedders its distilled_guidance_layer replaces
_PRUNED = ("_mod.lin", "modulation.lin", "time_in.", "vector_in.", "guidance_in.", "adaLN_modulation")
_GUIDANCE = "distilled_guidance_layer."

ORIGINAL_MODULES: tuple[ModuleRule, ...] = (
    *(rule for rule in FLUX1_MODULES if not any(part in rule.original for part in _PRUNED)),
    ModuleRule(_GUIDANCE + "in_proj", (_GUIDANCE + "in_proj",)),
    ModuleRule(_GUIDANCE + "layers.{i}.in_layer", (_GUIDANCE + "layers.{i}.linear_1",)),
    ModuleRule(_GUIDANCE + "layers.{i}.out_layer", (_GUIDANCE + "layers.{i}.linear_2",)),
    ModuleRule(_GUIDANCE + "out_proj", (_GUIDANCE + "out_proj",)),
)

ORIGINAL_PARAMS: tuple[ParamRule, ...] = (
    *FLUX1_PARAMS,
    ParamRule(_GUIDANCE + "norms.{i}.scale", _GUIDANCE + "norms.{i}.weight"),
)

GRID = GridCall(
    attention_kwargs="joint_attention_kwargs",
    negative_prompt="native",
    default_guidance=5.0,
    guidance="classifier-free guidance scale (Chroma is not guidance-distilled)",
)

IMAGE_INPUT_PIPELINES = ("ChromaImg2ImgPipeline", "ChromaInpaintPipeline")

CHROMA = Family(
    key="chroma",
    label="Chroma",
    pipeline_class="ChromaPipeline",
    pipeline_classes=("ChromaPipeline", *IMAGE_INPUT_PIPELINES),
    lora_mixin="FluxLoraLoaderMixin",
    denoiser="transformer",
    lora_components=("transformer",),
    default_size=1024,
    grid=GRID,
    single_file_layout=MappingProxyType({"transformer": SingleFileComponent("", "rules")}),
    block_groups=BLOCK_GROUPS,
    original_modules=ORIGINAL_MODULES,
    original_params=ORIGINAL_PARAMS,
    lora_only_modules=XLABS_MODULES,
    kohya_prefixes=MappingProxyType({"transformer": "lora_unet"}),
    converts_original_loras=True,
    image_input_pipelines=IMAGE_INPUT_PIPELINES,
    reads_loras_of=("flux",),
)
