"""Wan 2.1 / 2.2 (T2V, I2V, TI2V-5B, the A14B two-expert models): the video family, as tables.

- ``ORIGINAL_MODULES``/``ORIGINAL_PARAMS``: every module and parameter of Wan-AI's original layout
  (``wan2.1_t2v_1.3B_fp16.safetensors``, ComfyUI's ``diffusion_model.blocks.0.self_attn.q`` and
  musubi-tuner's ``lora_unet_blocks_0_self_attn_q`` LoRA names) and its ``WanTransformer3DModel``
  name — the inverse of diffusers' ``convert_wan_transformer_to_diffusers`` (``self_attn`` =
  ``attn1``, ``cross_attn`` = ``attn2``, ``ffn.0``/``ffn.2`` = ``ffn.net.0.proj``/``ffn.net.2``, the
  block's affine ``norm3`` is diffusers' ``norm2``, ``modulation`` is ``scale_shift_table``). No module
  is fused: every rule is one diffusers module.
- ``BLOCK_GROUPS``: ``blocks`` (30 in 1.3B and TI2V-5B, 40 in the 14B models), config ``num_layers``.
- ``VARIANTS``: by hidden width — 1.3B (1536), TI2V-5B (3072), 14B (5120: Wan 2.1 T2V/I2V-14B and
  each Wan 2.2 A14B expert, which share one architecture).
- Two experts: Wan 2.2 A14B pipelines hold ``transformer`` (high-noise steps) and ``transformer_2``
  (low-noise steps). One LoRA file is loaded into one expert at a time (``load_into_transformer_2``),
  so a recipe says which (``load_into``), weights address each (``transformer_2: 0.8``), and a
  single file or a LoRA file holds one expert (``component``).
- Image-to-video (``WanImageToVideoPipeline``): Wan 2.1 I2V-14B adds a CLIP vision ``image_encoder``
  (no LoRA goes there) and image cross-attention (``cross_attn.k_img``/``v_img``, ``img_emb``: the
  ``image_modules``); Wan 2.2 I2V-A14B has neither, only two experts. Loaded, fused and written like
  T2V; a grid needs an input image and is refused. diffusers gives a T2V LoRA zero image
  cross-attention factors on an I2V base (a no-op); an I2V LoRA on a base without them is refused.
- ``GRID``: classifier-free guidance with a negative prompt, LoRA scale through
  ``attention_kwargs``, a video of ``frames`` frames per cell (81 in the released models).
"""

from __future__ import annotations

from types import MappingProxyType

from .spec import BlockGroup, Family, GridCall, ModuleRule, ParamRule, SingleFileComponent, Variant

__all__ = [
    "BLOCK_GROUPS",
    "IMAGE_TO_VIDEO_PIPELINES",
    "ORIGINAL_MODULES",
    "ORIGINAL_PARAMS",
    "VARIANTS",
    "WAN",
]

_B = "blocks.{i}."


def _attention(original: str, diffusers: str) -> tuple[ModuleRule, ...]:
    """q/k/v/o of one attention -> to_q/to_k/to_v/to_out.0."""
    names = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
    return tuple(ModuleRule(f"{_B}{original}.{o}", (f"{_B}{diffusers}.{d}",)) for o, d in names.items())


ORIGINAL_MODULES: tuple[ModuleRule, ...] = (
    *_attention("self_attn", "attn1"),
    *_attention("cross_attn", "attn2"),
    ModuleRule(_B + "cross_attn.k_img", (_B + "attn2.add_k_proj",)),  # I2V: image context
    ModuleRule(_B + "cross_attn.v_img", (_B + "attn2.add_v_proj",)),
    ModuleRule(_B + "ffn.0", (_B + "ffn.net.0.proj",)),
    ModuleRule(_B + "ffn.2", (_B + "ffn.net.2",)),
    ModuleRule("patch_embedding", ("patch_embedding",)),
    ModuleRule("text_embedding.0", ("condition_embedder.text_embedder.linear_1",)),
    ModuleRule("text_embedding.2", ("condition_embedder.text_embedder.linear_2",)),
    ModuleRule("time_embedding.0", ("condition_embedder.time_embedder.linear_1",)),
    ModuleRule("time_embedding.2", ("condition_embedder.time_embedder.linear_2",)),
    ModuleRule("time_projection.1", ("condition_embedder.time_proj",)),
    ModuleRule("head.head", ("proj_out",)),
    ModuleRule("img_emb.proj.1", ("condition_embedder.image_embedder.ff.net.0.proj",)),
    ModuleRule("img_emb.proj.3", ("condition_embedder.image_embedder.ff.net.2",)),
)

ORIGINAL_PARAMS: tuple[ParamRule, ...] = (
    ParamRule(_B + "self_attn.norm_q.weight", _B + "attn1.norm_q.weight"),
    ParamRule(_B + "self_attn.norm_k.weight", _B + "attn1.norm_k.weight"),
    ParamRule(_B + "cross_attn.norm_q.weight", _B + "attn2.norm_q.weight"),
    ParamRule(_B + "cross_attn.norm_k.weight", _B + "attn2.norm_k.weight"),
    ParamRule(_B + "cross_attn.norm_k_img.weight", _B + "attn2.norm_added_k.weight"),
    ParamRule(_B + "norm3.weight", _B + "norm2.weight"),
    ParamRule(_B + "norm3.bias", _B + "norm2.bias"),
    ParamRule(_B + "modulation", _B + "scale_shift_table"),
    ParamRule("head.modulation", "scale_shift_table"),
    ParamRule("img_emb.proj.0.weight", "condition_embedder.image_embedder.norm1.weight"),
    ParamRule("img_emb.proj.0.bias", "condition_embedder.image_embedder.norm1.bias"),
    ParamRule("img_emb.proj.4.weight", "condition_embedder.image_embedder.norm2.weight"),
    ParamRule("img_emb.proj.4.bias", "condition_embedder.image_embedder.norm2.bias"),
)

BLOCK_GROUPS: tuple[BlockGroup, ...] = (
    BlockGroup(
        "blocks", "blocks", "num_layers", "transformer blocks (40 in the 14B models, 30 in 1.3B and 5B)"
    ),
)

VARIANTS: tuple[Variant, ...] = (
    Variant("Wan 2.1 1.3B", 1536),
    Variant("Wan 2.2 TI2V-5B", 3072),
    Variant("Wan 14B (2.1 T2V/I2V-14B, or one 2.2 A14B expert)", 5120),
)

IMAGE_TO_VIDEO_PIPELINES = ("WanImageToVideoPipeline",)

GRID = GridCall(
    attention_kwargs="attention_kwargs",
    negative_prompt="native",
    default_guidance=5.0,
    guidance="classifier-free guidance scale (both experts of Wan 2.2 A14B)",
    frames=81,
)

WAN = Family(
    key="wan",
    label="Wan",
    pipeline_class="WanPipeline",
    pipeline_classes=("WanPipeline", *IMAGE_TO_VIDEO_PIPELINES),
    lora_mixin="WanLoraLoaderMixin",
    denoiser="transformer",
    lora_components=("transformer", "transformer_2"),
    default_size=480,
    grid=GRID,
    single_file_layout=MappingProxyType({"transformer": SingleFileComponent("", "rules")}),
    block_groups=BLOCK_GROUPS,
    original_modules=ORIGINAL_MODULES,
    original_params=ORIGINAL_PARAMS,
    kohya_prefixes=MappingProxyType({"transformer": "lora_unet"}),
    converts_original_loras=True,
    variants=VARIANTS,
    experts=("transformer", "transformer_2"),
    image_input_pipelines=IMAGE_TO_VIDEO_PIPELINES,
    image_input_use=("animates an input image (image-to-video)", "the image-to-video model"),
    image_modules=("add_k_proj", "add_v_proj", "image_embedder", "k_img", "v_img", "img_emb"),
    keep_in_float32=("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"),
)
