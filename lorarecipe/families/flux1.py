"""FLUX.1 (dev, schnell, Kontext, Fill): the first transformer family, as tables.

- ``ORIGINAL_MODULES``: every module of Black Forest Labs' original layout (``flux1-dev.safetensors``,
  kohya/ComfyUI/ai-toolkit LoRA names) and the diffusers ``FluxTransformer2DModel`` modules its
  weight holds — the inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``
  (fused ``qkv`` = to_q | to_k | to_v rows; single-block ``linear1`` = to_q | to_k | to_v | proj_mlp;
  ``final_layer.adaLN_modulation.1`` = norm_out.linear with its shift/scale halves swapped).
  One table serves the single-file export and reading LoRAs in the original names, both ways.
- ``XLABS_MODULES``: XLabs' LoRA names (``processor.qkv_lora1``, …), read only.
- ``BLOCK_GROUPS``: ``double_blocks`` and ``single_blocks`` for per-block weights (the BFL names
  users know from ComfyUI and kohya), counted by the transformer config's ``num_layers`` and
  ``num_single_layers``.
- ``GRID``: guidance-distilled call: ``guidance_scale`` is the embedded guidance, a negative prompt
  only with true CFG, LoRA scale through ``joint_attention_kwargs``.
- ``IMAGE_INPUT_PIPELINES``: Kontext (edits an input image) and Fill (inpaints an input image under a
  mask) share FLUX.1's ``FluxTransformer2DModel`` (Fill's ``x_embedder`` takes 384 input channels: the
  latents, the masked image and the mask), its LoRA loader and original layout: their bases are loaded,
  fused and written like FLUX.1-dev, but not rendered in grids (a grid renders from prompts only).
"""

from __future__ import annotations

from types import MappingProxyType

from .spec import BlockGroup, Family, GridCall, ModuleRule, ParamRule, SingleFileComponent, Split

__all__ = [
    "BLOCK_GROUPS",
    "FLUX1",
    "IMAGE_INPUT_PIPELINES",
    "ORIGINAL_MODULES",
    "ORIGINAL_PARAMS",
    "XLABS_MODULES",
]

_D = "transformer_blocks.{i}."  # diffusers double-stream block
_S = "single_transformer_blocks.{i}."  # diffusers single-stream block

ORIGINAL_MODULES: tuple[ModuleRule, ...] = (
    ModuleRule(
        "double_blocks.{i}.img_attn.qkv", (_D + "attn.to_q", _D + "attn.to_k", _D + "attn.to_v"), Split.EQUAL
    ),
    ModuleRule(
        "double_blocks.{i}.txt_attn.qkv",
        (_D + "attn.add_q_proj", _D + "attn.add_k_proj", _D + "attn.add_v_proj"),
        Split.EQUAL,
    ),
    ModuleRule("double_blocks.{i}.img_attn.proj", (_D + "attn.to_out.0",)),
    ModuleRule("double_blocks.{i}.txt_attn.proj", (_D + "attn.to_add_out",)),
    ModuleRule("double_blocks.{i}.img_mlp.0", (_D + "ff.net.0.proj",)),
    ModuleRule("double_blocks.{i}.img_mlp.2", (_D + "ff.net.2",)),
    ModuleRule("double_blocks.{i}.txt_mlp.0", (_D + "ff_context.net.0.proj",)),
    ModuleRule("double_blocks.{i}.txt_mlp.2", (_D + "ff_context.net.2",)),
    ModuleRule("double_blocks.{i}.img_mod.lin", (_D + "norm1.linear",)),
    ModuleRule("double_blocks.{i}.txt_mod.lin", (_D + "norm1_context.linear",)),
    ModuleRule(
        "single_blocks.{i}.linear1",
        (_S + "attn.to_q", _S + "attn.to_k", _S + "attn.to_v", _S + "proj_mlp"),
        Split.QKV_REST,
    ),
    ModuleRule("single_blocks.{i}.linear2", (_S + "proj_out",)),
    ModuleRule("single_blocks.{i}.modulation.lin", (_S + "norm.linear",)),
    ModuleRule("img_in", ("x_embedder",)),
    ModuleRule("txt_in", ("context_embedder",)),
    ModuleRule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ModuleRule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ModuleRule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ModuleRule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ModuleRule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    ModuleRule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ModuleRule("final_layer.linear", ("proj_out",)),
    ModuleRule("final_layer.adaLN_modulation.1", ("norm_out.linear",), Split.SWAP_HALVES),
)

ORIGINAL_PARAMS: tuple[ParamRule, ...] = (
    ParamRule("double_blocks.{i}.img_attn.norm.query_norm.scale", _D + "attn.norm_q.weight"),
    ParamRule("double_blocks.{i}.img_attn.norm.key_norm.scale", _D + "attn.norm_k.weight"),
    ParamRule("double_blocks.{i}.txt_attn.norm.query_norm.scale", _D + "attn.norm_added_q.weight"),
    ParamRule("double_blocks.{i}.txt_attn.norm.key_norm.scale", _D + "attn.norm_added_k.weight"),
    ParamRule("single_blocks.{i}.norm.query_norm.scale", _S + "attn.norm_q.weight"),
    ParamRule("single_blocks.{i}.norm.key_norm.scale", _S + "attn.norm_k.weight"),
)

# XLabs names the attention LoRAs after its processors (diffusers' _convert_xlabs_flux_lora_to_diffusers).
XLABS_MODULES: tuple[ModuleRule, ...] = (
    ModuleRule(
        "double_blocks.{i}.processor.qkv_lora1",
        (_D + "attn.to_q", _D + "attn.to_k", _D + "attn.to_v"),
        Split.EQUAL,
    ),
    ModuleRule(
        "double_blocks.{i}.processor.qkv_lora2",
        (_D + "attn.add_q_proj", _D + "attn.add_k_proj", _D + "attn.add_v_proj"),
        Split.EQUAL,
    ),
    ModuleRule("double_blocks.{i}.processor.proj_lora1", (_D + "attn.to_out.0",)),
    ModuleRule("double_blocks.{i}.processor.proj_lora2", (_D + "attn.to_add_out",)),
    ModuleRule(
        "single_blocks.{i}.processor.qkv_lora",
        (_S + "attn.to_q", _S + "attn.to_k", _S + "attn.to_v"),
        Split.EQUAL,
    ),
    ModuleRule("single_blocks.{i}.processor.proj_lora", (_S + "proj_out",)),
)

BLOCK_GROUPS: tuple[BlockGroup, ...] = (
    BlockGroup(
        "double_blocks",
        "transformer_blocks",
        "num_layers",
        "double-stream blocks (diffusers transformer_blocks; 19 in FLUX.1)",
    ),
    BlockGroup(
        "single_blocks",
        "single_transformer_blocks",
        "num_single_layers",
        "single-stream blocks (diffusers single_transformer_blocks; 38 in FLUX.1)",
    ),
)

GRID = GridCall(
    attention_kwargs="joint_attention_kwargs",
    negative_prompt="true_cfg",
    default_guidance=3.5,
    guidance="distilled guidance embedded in FLUX.1-dev (schnell ignores it), not classifier-free guidance",
)

IMAGE_INPUT_PIPELINES = ("FluxKontextPipeline", "FluxKontextInpaintPipeline", "FluxFillPipeline")

FLUX1 = Family(
    key="flux",
    label="FLUX.1",
    pipeline_class="FluxPipeline",
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", *IMAGE_INPUT_PIPELINES),
    lora_mixin="FluxLoraLoaderMixin",
    denoiser="transformer",
    lora_components=("transformer", "text_encoder"),
    default_size=1024,
    grid=GRID,
    single_file_layout=MappingProxyType({"transformer": SingleFileComponent("", "rules")}),
    block_groups=BLOCK_GROUPS,
    original_modules=ORIGINAL_MODULES,
    original_params=ORIGINAL_PARAMS,
    lora_only_modules=XLABS_MODULES,
    kohya_prefixes=MappingProxyType({"transformer": "lora_unet", "text_encoder": "lora_te1"}),
    converts_original_loras=True,
    image_input_pipelines=("FluxImg2ImgPipeline", "FluxInpaintPipeline", *IMAGE_INPUT_PIPELINES),
)
