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

import torch

from .qwen_tokenizer import build_qwen_tokenizer

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
    torch.manual_seed(_SEED + 101)
    transformer = QwenImageTransformer2DModel(
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
    torch.manual_seed(_SEED + 102)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    torch.manual_seed(_SEED + 103)
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
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
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

    from .materialize import _vae

    tok = build_qwen_tokenizer(chat_template=True)
    torch.manual_seed(_SEED + 111)
    transformer = ZImageTransformer2DModel(
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
    torch.manual_seed(_SEED + 112)
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    torch.manual_seed(_SEED + 113)
    text_encoder = Qwen3Model(
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
        )
    )
    scheduler = _flow_scheduler(shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    )


def build_sd3() -> Any:
    """SD 3.5-Medium-like pipeline (see the module docstring)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .materialize import _clip_config, _vae
    from .tokenizer import build_clip_tokenizer, build_t5_tokenizer

    tok, tok_2, tok_3 = build_clip_tokenizer(), build_clip_tokenizer(), build_t5_tokenizer()
    torch.manual_seed(_SEED + 121)
    transformer = SD3Transformer2DModel(
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
    torch.manual_seed(_SEED + 122)
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    torch.manual_seed(_SEED + 123)
    text_encoder = CLIPTextModelWithProjection(_clip_config(len(tok), tok))
    torch.manual_seed(_SEED + 124)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(tok_2), tok_2))
    torch.manual_seed(_SEED + 125)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok_3),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
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


def _flux2_scheduler() -> Any:
    return _flow_scheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
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
    torch.manual_seed(_SEED + 31)
    transformer = _flux2_transformer(guidance=True)
    torch.manual_seed(_SEED + 32)
    vae = _flux2_vae()
    torch.manual_seed(_SEED + 33)
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
    text_encoder = Mistral3ForConditionalGeneration(config)
    return Flux2Pipeline(
        scheduler=_flux2_scheduler(),
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
    torch.manual_seed(_SEED + 41)
    transformer = _flux2_transformer(guidance=False)
    torch.manual_seed(_SEED + 42)
    vae = _flux2_vae()
    torch.manual_seed(_SEED + 43)
    text_encoder = Qwen3ForCausalLM(
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
        )
    )
    return Flux2KleinPipeline(
        scheduler=_flux2_scheduler(),
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
    from transformers import UMT5Config, UMT5EncoderModel

    from .tokenizer import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    base = _SEED + (51 if experts == 1 else 61)
    torch.manual_seed(base)
    transformer = _wan_transformer()
    transformer_2 = None
    if experts == 2:
        torch.manual_seed(base + 4)
        transformer_2 = _wan_transformer()
    torch.manual_seed(base + 1)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    torch.manual_seed(base + 2)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
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
