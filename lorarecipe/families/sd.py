"""The UNet families: SD 1.x, SD 2.x and SDXL.

Their single-file layouts (LDM for SD 1.x/2.x, SGM for SDXL) are written by the key mappers of
:mod:`lorarecipe.outputs.singlefile_names`, named here per component; per-block weights are
diffusers' own UNet dicts (``{down: …, mid: …, up: …}``), so they have no block groups of their own.
"""

from __future__ import annotations

from types import MappingProxyType

from .spec import Family, GridCall, SingleFileComponent

__all__ = ["SD1", "SD2", "SDXL"]

_CFG = GridCall(
    attention_kwargs="cross_attention_kwargs",
    negative_prompt="native",
    default_guidance=7.5,
    guidance="classifier-free guidance scale",
)
_SD_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
)
_LDM = MappingProxyType(
    {
        "unet": SingleFileComponent("model.diffusion_model.", "unet"),
        "vae": SingleFileComponent("first_stage_model.", "vae"),
    }
)

SD1 = Family(
    key="sd1",
    label="SD 1.x",
    pipeline_class="StableDiffusionPipeline",
    pipeline_classes=_SD_PIPELINES,
    image_input_pipelines=_SD_PIPELINES[1:],
    lora_mixin="StableDiffusionLoraLoaderMixin",
    denoiser="unet",
    lora_components=("unet", "text_encoder"),
    default_size=512,
    grid=_CFG,
    single_file_layout=MappingProxyType(
        {**_LDM, "text_encoder": SingleFileComponent("cond_stage_model.transformer.", "hf_clip")}
    ),
    kohya_prefixes=MappingProxyType({"unet": "lora_unet", "text_encoder": "lora_te"}),
)

SD2 = Family(
    key="sd2",
    label="SD 2.x",
    pipeline_class="StableDiffusionPipeline",
    pipeline_classes=_SD_PIPELINES,
    image_input_pipelines=_SD_PIPELINES[1:],
    lora_mixin="StableDiffusionLoraLoaderMixin",
    denoiser="unet",
    lora_components=("unet", "text_encoder"),
    default_size=768,
    grid=_CFG,
    single_file_layout=MappingProxyType(
        {**_LDM, "text_encoder": SingleFileComponent("cond_stage_model.model.", "open_clip")}
    ),
    kohya_prefixes=MappingProxyType({"unet": "lora_unet", "text_encoder": "lora_te"}),
)

SDXL = Family(
    key="sdxl",
    label="SDXL",
    pipeline_class="StableDiffusionXLPipeline",
    pipeline_classes=(
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    ),
    image_input_pipelines=("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    lora_mixin="StableDiffusionXLLoraLoaderMixin",
    denoiser="unet",
    lora_components=("unet", "text_encoder", "text_encoder_2"),
    default_size=1024,
    grid=_CFG,
    single_file_layout=MappingProxyType(
        {
            **_LDM,
            "text_encoder": SingleFileComponent("conditioner.embedders.0.transformer.", "hf_clip"),
            "text_encoder_2": SingleFileComponent("conditioner.embedders.1.model.", "open_clip"),
        }
    ),
    kohya_prefixes=MappingProxyType(
        {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    ),
)
