"""Built-in tiny DiT pipelines from configs: Qwen-Image, Z-Image, SD 3, FLUX.2 and Wan (random, offline).

Each builder returns a fresh fp32 CPU pipeline of the real diffusers classes at toy widths, every
component from a small config and a fixed seed, with the text encoder of the real model at toy size
and a tokenizer built in code (``qwen_tokenizer``: Qwen-Image's and Z-Image's; ``chat_tokenizer``: the
Qwen3 and Mistral 3 chat tokenizers of FLUX.2; ``tokenizer``: CLIP and the T5 tokenizer of SD 3's T5
and Wan's UMT5). Text encoders are narrow but as deep as the pipelines' hidden-state indices need
(FLUX.2 dev stacks layers 10, 20 and 30 of Mistral 3, Klein layers 9, 18 and 27 of Qwen3), so the
pipelines run unchanged at their defaults.

- ``tiny-qwen-image``: ``QwenImageTransformer2DModel`` (2 joint blocks of width 32), the 3-D causal
  ``AutoencoderKLQwenImage``, a 2-layer ``Qwen2_5_VLForConditionalGeneration`` (its vision tower at
  depth 1, unused by text-to-image) and an offline ``Qwen2Tokenizer`` in which Qwen-Image's prompt
  template is the 34 tokens the pipeline drops;
- ``tiny-z-image``: ``ZImageTransformer2DModel`` (2 layers, 1 noise + 1 context refiner), FLUX's VAE
  layout, a 2-layer ``Qwen3Model`` and the same tokenizer with Qwen3's chat template;
- ``tiny-sd3``: ``SD3Transformer2DModel`` as SD 3.5 Medium is built (2 joint blocks, the first with the
  second attention, RMS q/k norms, the last block's context stream pre-only), two CLIP encoders with
  projection and a T5 encoder;
- ``tiny-flux2``: FLUX.2 dev-like (``Flux2Pipeline``): 2 double + 2 single blocks of width 32 with the
  guidance embedding, Mistral 3 text encoder (its Pixtral vision tower included, unused by text
  prompts), FLUX.2 VAE with 4 latent channels (16 after 2×2 patchify);
- ``tiny-flux2-klein``: FLUX.2 Klein-like (``Flux2KleinPipeline``, not step-distilled: guidance is
  classifier-free): the same transformer without the guidance embedding, Qwen3 text encoder;
- ``tiny-wan``: Wan 2.1 T2V-like (``WanPipeline``): one 2-block transformer, UMT5 encoder, Wan VAE
  (8× spatial, 4× temporal), UniPC flow-matching scheduler;
- ``tiny-wan22``: Wan 2.2 T2V-A14B-like: two experts, ``transformer`` for the high-noise steps and
  ``transformer_2`` for the low-noise ones, switching at ``boundary_ratio`` 0.875.

The image pipelines make 64 px images: 16×16 latents (VAE factor 4), 8×8 tokens after 2×2 patches.
"""

from __future__ import annotations

from typing import Any

from .qwen_tokenizer import build_qwen_tokenizer
from .tiny_components import flux_flow_scheduler, seeded, tiny_clip_config, tiny_t5_encoder, tiny_vae

__all__ = [
    "build_flux2",
    "build_flux2_klein",
    "build_qwen_image",
    "build_sd3",
    "build_wan",
    "build_wan22",
    "build_z_image",
]

_SEED = 0  # component seeds are _SEED + an offset of their own, independent of the other built-ins'


def _flow_scheduler(**config: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def build_qwen_image() -> Any:
    """Qwen-Image-like pipeline (see the module docstring)."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = build_qwen_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start", "vision_end")}
    transformer = seeded(
        _SEED + 101,
        QwenImageTransformer2DModel,
        patch_size=2,
        in_channels=16,  # 4 latent channels × 2×2 packing
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = seeded(
        _SEED + 102,
        AutoencoderKLQwenImage,
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    text = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": len(tok),
        "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
        "rope_theta": 1e6,
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 32,
        },
        vocab_size=len(tok),
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
    )
    text_encoder = seeded(_SEED + 103, Qwen2_5_VLForConditionalGeneration, config)
    scheduler = _flow_scheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        shift=1.0,
        shift_terminal=0.02,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
    )
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    )


def build_z_image() -> Any:
    """Z-Image-like pipeline (see the module docstring)."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = build_qwen_tokenizer(chat_template=True)
    transformer = seeded(
        _SEED + 111,
        ZImageTransformer2DModel,
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=32,
        axes_dims=[4, 6, 6],
        axes_lens=[256, 32, 32],
    )
    vae = seeded(_SEED + 112, tiny_vae, (0.1159, 0.3611))
    text_encoder = seeded(
        _SEED + 113,
        Qwen3Model,
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=1024,
            bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        ),
    )
    scheduler = _flow_scheduler(shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    )


def build_sd3() -> Any:
    """SD 3.5-Medium-like pipeline (see the module docstring)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from .tokenizer import build_clip_tokenizer, build_t5_tokenizer

    tok, tok_2, tok_3 = build_clip_tokenizer(), build_clip_tokenizer(), build_t5_tokenizer()
    transformer = seeded(
        _SEED + 121,
        SD3Transformer2DModel,
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,  # both CLIPs' pooled projections, concatenated
        out_channels=4,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = seeded(_SEED + 122, tiny_vae, (0.0609, 1.5035))
    text_encoder = seeded(_SEED + 123, CLIPTextModelWithProjection, tiny_clip_config(tok))
    text_encoder_2 = seeded(_SEED + 124, CLIPTextModelWithProjection, tiny_clip_config(tok_2))
    text_encoder_3 = seeded(_SEED + 125, tiny_t5_encoder, tok_3)
    return StableDiffusion3Pipeline(
        scheduler=_flow_scheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tok_3,
        transformer=transformer,
    )


def _flux2_transformer(guidance: bool) -> Any:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels × 2×2 patchify
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,  # 3 stacked hidden states of a width-16 text encoder
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance,
    )


def _flux2_vae() -> Any:
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
    )


def build_flux2() -> Any:
    """FLUX.2 dev-like pipeline (module docstring)."""
    from diffusers import Flux2Pipeline
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    from .chat_tokenizer import build_chat_tokenizer

    tokenizer = build_chat_tokenizer("mistral")
    transformer = seeded(_SEED + 31, _flux2_transformer, guidance=True)
    vae = seeded(_SEED + 32, _flux2_vae)
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=8,
            image_size=32,
            patch_size=16,
        ),
        text_config=MistralConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=30,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            sliding_window=None,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=1,
    )
    text_encoder = seeded(_SEED + 33, Mistral3ForConditionalGeneration, config)
    return Flux2Pipeline(
        scheduler=flux_flow_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def build_flux2_klein() -> Any:
    """FLUX.2 Klein-like pipeline (module docstring)."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .chat_tokenizer import build_chat_tokenizer

    tokenizer = build_chat_tokenizer("qwen3")
    transformer = seeded(_SEED + 41, _flux2_transformer, guidance=False)
    vae = seeded(_SEED + 42, _flux2_vae)
    text_encoder = seeded(
        _SEED + 43,
        Qwen3ForCausalLM,
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=27,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        ),
    )
    return Flux2KleinPipeline(
        scheduler=flux_flow_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )


def _wan_transformer() -> Any:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def _wan(experts: int) -> Any:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    from .tokenizer import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    base = _SEED + (51 if experts == 1 else 61)
    transformer = seeded(base, _wan_transformer)
    transformer_2 = seeded(base + 4, _wan_transformer) if experts == 2 else None
    vae = seeded(
        base + 1,
        AutoencoderKLWan,
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    text_encoder = seeded(base + 2, tiny_t5_encoder, tokenizer, umt5=True)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=0.875 if experts == 2 else None,
    )


def build_wan() -> Any:
    """Wan 2.1 T2V-like pipeline, one transformer (module docstring)."""
    return _wan(1)


def build_wan22() -> Any:
    """Wan 2.2 T2V-A14B-like pipeline, two experts (module docstring)."""
    return _wan(2)
