"""FLUX.2 (dev, Klein 4B/9B): BFL's second transformer family, as tables.

- ``ORIGINAL_MODULES``: every module of Black Forest Labs' layout (``flux2-dev.safetensors``,
  ``flux-2-klein-4b.safetensors``; kohya/musubi and ai-toolkit LoRA names) and the diffusers
  ``Flux2Transformer2DModel`` modules its weight holds — the inverse of diffusers'
  ``convert_flux2_transformer_checkpoint_to_diffusers``: fused ``qkv`` = to_q | to_k | to_v rows;
  single-block ``linear1`` is diffusers' fused ``attn.to_qkv_mlp_proj`` as it is; the modulation is
  shared by all blocks (``double_stream_modulation_img.lin``, …), not per block as in FLUX.1;
  ``final_layer.adaLN_modulation.1`` = ``norm_out.linear`` with its shift/scale halves swapped.
- ``BLOCK_GROUPS``: ``double_blocks`` and ``single_blocks`` (8 + 48 in dev, 5 + 20 in Klein 4B, 8 + 24
  in Klein 9B), counted by the transformer config's ``num_layers`` and ``num_single_layers``.
- ``VARIANTS``: dev (width 6144), Klein 4B (3072), Klein 9B (4096), from the released configs.
- ``GRID``: no negative prompt (dev embeds a distilled guidance; Klein base models use classifier-free
  guidance with an empty negative prompt, the step-distilled Klein models ignore guidance), LoRA
  scale through ``attention_kwargs``.

Both pipelines (``Flux2Pipeline`` with a Mistral 3 text encoder, ``Flux2KleinPipeline`` with Qwen3)
load LoRAs into the transformer only (``Flux2LoraLoaderMixin``).
"""

from __future__ import annotations

from types import MappingProxyType

from .spec import BlockGroup, Family, GridCall, ModuleRule, ParamRule, SingleFileComponent, Split, Variant

__all__ = ["BLOCK_GROUPS", "FLUX2", "ORIGINAL_MODULES", "ORIGINAL_PARAMS", "VARIANTS"]

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
    ModuleRule("double_blocks.{i}.img_mlp.0", (_D + "ff.linear_in",)),
    ModuleRule("double_blocks.{i}.img_mlp.2", (_D + "ff.linear_out",)),
    ModuleRule("double_blocks.{i}.txt_mlp.0", (_D + "ff_context.linear_in",)),
    ModuleRule("double_blocks.{i}.txt_mlp.2", (_D + "ff_context.linear_out",)),
    ModuleRule("single_blocks.{i}.linear1", (_S + "attn.to_qkv_mlp_proj",)),
    ModuleRule("single_blocks.{i}.linear2", (_S + "attn.to_out",)),
    ModuleRule("img_in", ("x_embedder",)),
    ModuleRule("txt_in", ("context_embedder",)),
    ModuleRule("time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1",)),
    ModuleRule("time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2",)),
    ModuleRule("guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1",)),
    ModuleRule("guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2",)),
    ModuleRule("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",)),
    ModuleRule("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",)),
    ModuleRule("single_stream_modulation.lin", ("single_stream_modulation.linear",)),
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

BLOCK_GROUPS: tuple[BlockGroup, ...] = (
    BlockGroup(
        "double_blocks",
        "transformer_blocks",
        "num_layers",
        "double-stream blocks (diffusers transformer_blocks; 8 in dev, 5 in Klein 4B, 8 in Klein 9B)",
    ),
    BlockGroup(
        "single_blocks",
        "single_transformer_blocks",
        "num_single_layers",
        "single-stream blocks (diffusers single_transformer_blocks; 48 in dev, 20 in Klein 4B, 24 in "
        "Klein 9B)",
    ),
)

VARIANTS: tuple[Variant, ...] = (
    Variant("FLUX.2 dev", 6144),
    Variant("FLUX.2 Klein 4B", 3072),
    Variant("FLUX.2 Klein 9B", 4096),
)

GRID = GridCall(
    attention_kwargs="attention_kwargs",
    negative_prompt="none",
    default_guidance=4.0,
    guidance="FLUX.2 dev: the embedded distilled guidance; Klein base models: classifier-free guidance "
    "(empty negative prompt); the step-distilled Klein models ignore it",
)

FLUX2 = Family(
    key="flux2",
    label="FLUX.2",
    pipeline_class="Flux2Pipeline",
    pipeline_classes=("Flux2Pipeline", "Flux2KleinPipeline"),
    lora_mixin="Flux2LoraLoaderMixin",
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
    variants=VARIANTS,
    reads_raw_peft=True,
    lora_layouts=frozenset({"lokr"}),
)
