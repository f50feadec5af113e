"""SD 3 / 3.5 (Medium, Large, Large Turbo): the MMDiT, as tables.

- ``ORIGINAL_MODULES``/``ORIGINAL_PARAMS``: Stability's original layout (``sd3.5_large.safetensors``
  under ``model.diffusion_model.``; kohya sd-scripts LoRA names ``lora_unet_joint_blocks_0_x_block_attn_qkv``)
  and the diffusers ``SD3Transformer2DModel`` modules each weight holds — the inverse of diffusers'
  ``convert_sd3_transformer_checkpoint_to_diffusers``: fused ``qkv`` (= to_q | to_k | to_v rows, image
  ``x_block`` and text ``context_block``), the SD 3.5 Medium second attention (``attn2``), q/k norms
  (``ln_q``/``ln_k``), and the adaLN modulations whose shift/scale halves are swapped: the final layer
  always, and the last block's context modulation (an AdaLayerNormContinuous, twice as tall as wide,
  where the other blocks have an AdaLayerNormZero stored as it is).
- LoRAs: diffusers' ``SD3LoraLoaderMixin`` reads only diffusers/PEFT keys (transformer and both CLIP
  text encoders); lorarecipe converts kohya sd-scripts files itself (original names, ``lora_te1_``/
  ``lora_te2_``) and writes them, which ComfyUI reads.
- ``BLOCK_GROUPS``: ``joint_blocks`` (24 in SD 3 Medium, 38 in SD 3.5 Large), as ComfyUI names them.
- ``GRID``: classifier-free guidance with a negative prompt (diffusers' default 7.0), LoRA scale through
  ``joint_attention_kwargs``.
"""

from __future__ import annotations

from types import MappingProxyType

from .spec import BlockGroup, Family, GridCall, ModuleRule, ParamRule, SingleFileComponent, Split

__all__ = ["BLOCK_GROUPS", "ORIGINAL_MODULES", "ORIGINAL_PARAMS", "SD3"]

_J = "joint_blocks.{i}."
_T = "transformer_blocks.{i}."
_QKV = ("to_q", "to_k", "to_v")
_ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")

ORIGINAL_MODULES: tuple[ModuleRule, ...] = (
    ModuleRule(_J + "x_block.attn.qkv", tuple(_T + "attn." + p for p in _QKV), Split.EQUAL),
    ModuleRule(_J + "context_block.attn.qkv", tuple(_T + "attn." + p for p in _ADD_QKV), Split.EQUAL),
    ModuleRule(_J + "x_block.attn.proj", (_T + "attn.to_out.0",)),
    ModuleRule(_J + "context_block.attn.proj", (_T + "attn.to_add_out",)),
    ModuleRule(_J + "x_block.attn2.qkv", tuple(_T + "attn2." + p for p in _QKV), Split.EQUAL),
    ModuleRule(_J + "x_block.attn2.proj", (_T + "attn2.to_out.0",)),
    ModuleRule(_J + "x_block.adaLN_modulation.1", (_T + "norm1.linear",)),
    ModuleRule(
        _J + "context_block.adaLN_modulation.1", (_T + "norm1_context.linear",), Split.SWAP_HALVES_IF_PAIR
    ),
    ModuleRule(_J + "x_block.mlp.fc1", (_T + "ff.net.0.proj",)),
    ModuleRule(_J + "x_block.mlp.fc2", (_T + "ff.net.2",)),
    ModuleRule(_J + "context_block.mlp.fc1", (_T + "ff_context.net.0.proj",)),
    ModuleRule(_J + "context_block.mlp.fc2", (_T + "ff_context.net.2",)),
    ModuleRule("x_embedder.proj", ("pos_embed.proj",)),
    ModuleRule("context_embedder", ("context_embedder",)),
    ModuleRule("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    ModuleRule("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    ModuleRule("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    ModuleRule("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    ModuleRule("final_layer.linear", ("proj_out",)),
    ModuleRule("final_layer.adaLN_modulation.1", ("norm_out.linear",), Split.SWAP_HALVES),
)

ORIGINAL_PARAMS: tuple[ParamRule, ...] = (
    ParamRule("pos_embed", "pos_embed.pos_embed"),
    ParamRule(_J + "x_block.attn.ln_q.weight", _T + "attn.norm_q.weight"),
    ParamRule(_J + "x_block.attn.ln_k.weight", _T + "attn.norm_k.weight"),
    ParamRule(_J + "context_block.attn.ln_q.weight", _T + "attn.norm_added_q.weight"),
    ParamRule(_J + "context_block.attn.ln_k.weight", _T + "attn.norm_added_k.weight"),
    ParamRule(_J + "x_block.attn2.ln_q.weight", _T + "attn2.norm_q.weight"),
    ParamRule(_J + "x_block.attn2.ln_k.weight", _T + "attn2.norm_k.weight"),
)

BLOCK_GROUPS: tuple[BlockGroup, ...] = (
    BlockGroup(
        "joint_blocks",
        "transformer_blocks",
        "num_layers",
        "MMDiT joint blocks (diffusers transformer_blocks; 24 in SD 3 Medium, 38 in SD 3.5 Large)",
    ),
)

GRID = GridCall(
    attention_kwargs="joint_attention_kwargs",
    negative_prompt="native",
    default_guidance=7.0,
    guidance="classifier-free guidance scale",
)

SD3 = Family(
    key="sd3",
    label="SD 3",
    pipeline_class="StableDiffusion3Pipeline",
    pipeline_classes=(
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
    ),
    image_input_pipelines=("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    lora_mixin="SD3LoraLoaderMixin",
    denoiser="transformer",
    lora_components=("transformer", "text_encoder", "text_encoder_2"),
    default_size=1024,
    grid=GRID,
    single_file_layout=MappingProxyType(
        {"transformer": SingleFileComponent("model.diffusion_model.", "rules")}
    ),
    block_groups=BLOCK_GROUPS,
    original_modules=ORIGINAL_MODULES,
    original_params=ORIGINAL_PARAMS,
    kohya_prefixes=MappingProxyType(
        {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    ),
    converts_original_loras=True,
)
