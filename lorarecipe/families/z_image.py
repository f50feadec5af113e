"""Z-Image (Turbo, base): a single-stream DiT (30 layers + 2 noise and 2 context refiner layers), as tables.

- ``ORIGINAL_MODULES``/``ORIGINAL_PARAMS``: where Tongyi's original layout (``z_image_turbo_bf16.safetensors``
  as ComfyUI loads it, musubi's ComfyUI LoRA names) differs from diffusers' ``ZImageTransformer2DModel``:
  the fused ``attention.qkv`` (= to_q | to_k | to_v rows), ``attention.out``, ``q_norm``/``k_norm``, and
  the patch-size-keyed embedder and final layer (``x_embedder`` = ``all_x_embedder.2-1``). Every other
  module keeps its name (``feed_forward.w1``, ``adaLN_modulation.0``, ``t_embedder``, ``cap_embedder``).
  The inverse of diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers``.
- LoRAs in diffusers names are read by diffusers' ``ZImageLoraLoaderMixin`` (kohya/musubi, ai-toolkit
  and ComfyUI ``diffusion_model.``, bare names with ``.alpha``); LoRAs in the original names (ComfyUI's
  kohya layout ``lora_unet_layers_0_attention_qkv``, musubi's ComfyUI conversion) are converted by
  lorarecipe from these tables: diffusers splits their ``qkv`` too, but drops ``x_embedder`` and
  ``final_layer``. lorarecipe writes the kohya/ComfyUI layout in the original names (fused ``qkv``,
  block-diagonal), which ComfyUI reads.
- ``BLOCK_GROUPS``: ``layers``, ``noise_refiner``, ``context_refiner`` (the original and diffusers names).
- ``GRID``: classifier-free guidance with a negative prompt, diffusers' default 5.0; Z-Image-Turbo is
  guidance-distilled: give it ``guidance: 0`` and about 9 steps.
"""

from __future__ import annotations

from types import MappingProxyType

from .spec import BlockGroup, Family, GridCall, ModuleRule, ParamRule, SingleFileComponent, Split

__all__ = ["BLOCK_GROUPS", "ORIGINAL_MODULES", "ORIGINAL_PARAMS", "Z_IMAGE"]

_GROUPS = ("layers", "noise_refiner", "context_refiner")

ORIGINAL_MODULES: tuple[ModuleRule, ...] = (
    *(
        rule
        for group in _GROUPS
        for rule in (
            ModuleRule(
                f"{group}.{{i}}.attention.qkv",
                tuple(f"{group}.{{i}}.attention.to_{p}" for p in "qkv"),
                Split.EQUAL,
            ),
            ModuleRule(f"{group}.{{i}}.attention.out", (f"{group}.{{i}}.attention.to_out.0",)),
        )
    ),
    ModuleRule("x_embedder", ("all_x_embedder.2-1",)),
    ModuleRule("final_layer.linear", ("all_final_layer.2-1.linear",)),
    ModuleRule("final_layer.adaLN_modulation.1", ("all_final_layer.2-1.adaLN_modulation.1",)),
)

ORIGINAL_PARAMS: tuple[ParamRule, ...] = tuple(
    ParamRule(f"{group}.{{i}}.attention.{which}_norm.weight", f"{group}.{{i}}.attention.norm_{which}.weight")
    for group in _GROUPS
    for which in "qk"
)

BLOCK_GROUPS: tuple[BlockGroup, ...] = (
    BlockGroup("layers", "layers", "n_layers", "main transformer layers (30 in Z-Image)"),
    BlockGroup("noise_refiner", "noise_refiner", "n_refiner_layers", "image-token refiner layers (2)"),
    BlockGroup("context_refiner", "context_refiner", "n_refiner_layers", "text-token refiner layers (2)"),
)

GRID = GridCall(
    attention_kwargs="joint_attention_kwargs",
    negative_prompt="native",
    default_guidance=5.0,
    guidance="classifier-free guidance scale (Z-Image-Turbo is distilled: use 0)",
)

Z_IMAGE = Family(
    key="z_image",
    label="Z-Image",
    pipeline_class="ZImagePipeline",
    pipeline_classes=("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline"),
    image_input_pipelines=("ZImageImg2ImgPipeline", "ZImageInpaintPipeline"),
    lora_mixin="ZImageLoraLoaderMixin",
    denoiser="transformer",
    lora_components=("transformer",),
    default_size=1024,
    grid=GRID,
    single_file_layout=MappingProxyType({"transformer": SingleFileComponent("", "rules")}),
    block_groups=BLOCK_GROUPS,
    original_modules=ORIGINAL_MODULES,
    original_params=ORIGINAL_PARAMS,
    kohya_prefixes=MappingProxyType({"transformer": "lora_unet"}),
    converts_original_loras=True,
    original_keeps_names=True,
    lora_layouts=frozenset({"diffusion_model", "bare", "lokr"}),
)
