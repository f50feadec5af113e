"""Qwen-Image (and Qwen-Image-Edit): a 60-block MMDiT whose original checkpoints use diffusers' names.

- No original-layout table: Qwen's own release, ComfyUI's ``qwen_image_bf16.safetensors`` (the
  transformer alone) and the LoRAs trainers write all name modules as diffusers does
  (``transformer_blocks.0.img_mlp.net.0.proj``); diffusers' ``from_single_file`` reads such a file
  unchanged (its ``QwenImageTransformer2DModel`` mapping is the identity), so the single file is the
  transformer's state dict as it is.
- LoRAs: diffusers' ``QwenImageLoraLoaderMixin`` converts kohya/musubi (``lora_unet_…`` + ``.alpha``),
  ai-toolkit/ComfyUI (``diffusion_model.…``), bare names with ``.alpha`` keys and DiffSynth-Studio's
  PEFT keys (``….lora_A.default.weight``); ComfyUI reads the kohya names, which lorarecipe writes.
- ``BLOCK_GROUPS``: ``transformer_blocks`` (60), the name ComfyUI's Qwen-Image block-merge node uses.
- ``GRID``: classifier-free guidance is ``true_cfg_scale`` with a negative prompt (default 4.0);
  ``guidance_scale`` only feeds guidance-distilled variants. LoRA scale through ``attention_kwargs``.
- Edit pipelines take an input image: they are loaded, fused and written like the others, but not
  rendered in grids.
"""

from __future__ import annotations

from types import MappingProxyType

from .spec import BlockGroup, Family, GridCall, SingleFileComponent

__all__ = ["BLOCK_GROUPS", "EDIT_PIPELINES", "QWEN_IMAGE"]

BLOCK_GROUPS: tuple[BlockGroup, ...] = (
    BlockGroup(
        "transformer_blocks",
        "transformer_blocks",
        "num_layers",
        "joint image/text blocks (60 in Qwen-Image)",
    ),
)

EDIT_PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")

GRID = GridCall(
    attention_kwargs="attention_kwargs",
    negative_prompt="native",
    default_guidance=4.0,
    guidance="classifier-free guidance scale (Qwen-Image's true_cfg_scale)",
    guidance_argument="true_cfg_scale",
)

QWEN_IMAGE = Family(
    key="qwen_image",
    label="Qwen-Image",
    pipeline_class="QwenImagePipeline",
    pipeline_classes=(
        "QwenImagePipeline",
        "QwenImageImg2ImgPipeline",
        "QwenImageInpaintPipeline",
        *EDIT_PIPELINES,
    ),
    lora_mixin="QwenImageLoraLoaderMixin",
    denoiser="transformer",
    lora_components=("transformer",),
    default_size=1328,
    grid=GRID,
    single_file_layout=MappingProxyType({"transformer": SingleFileComponent("", "rules")}),
    block_groups=BLOCK_GROUPS,
    kohya_prefixes=MappingProxyType({"transformer": "lora_unet"}),
    original_keeps_names=True,
    lora_layouts=frozenset({"diffusion_model", "bare"}),
    image_input_pipelines=("QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", *EDIT_PIPELINES),
)
