"""The built-in FLUX.2 and Wan pipelines: tiny, random, seeded, offline (see ``materialize``).

Each builder -> a fresh pipeline of the real diffusers classes at toy widths, every component from a
config with a fixed seed, tokenizers built in code (``chat_tokenizer``: Qwen3 and Mistral 3 chat
tokenizers; ``tokenizer``: the T5 tokenizer for Wan's UMT5). The text encoders are narrow but as deep
as the pipelines' hidden-state indices need (FLUX.2 dev stacks layers 10, 20 and 30 of Mistral 3,
Klein layers 9, 18 and 27 of Qwen3), so the pipelines run unchanged at their defaults.

- ``tiny-flux2``: FLUX.2 dev-like (``Flux2Pipeline``): 2 double + 2 single blocks of width 32 with the
  guidance embedding, Mistral 3 text encoder (its Pixtral vision tower included, unused by text
  prompts), FLUX.2 VAE with 4 latent channels (16 after 2×2 patchify).
- ``tiny-flux2-klein``: FLUX.2 Klein-like (``Flux2KleinPipeline``, not step-distilled: guidance is
  classifier-free): the same transformer without the guidance embedding, Qwen3 text encoder.
- ``tiny-wan``: Wan 2.1 T2V-like (``WanPipeline``): one 2-block transformer, UMT5 encoder, Wan VAE
  (8× spatial, 4× temporal), UniPC flow-matching scheduler.
- ``tiny-wan22``: Wan 2.2 T2V-A14B-like: two experts, ``transformer`` for the high-noise steps and
  ``transformer_2`` for the low-noise ones, switching at ``boundary_ratio`` 0.875.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["build_flux2", "build_flux2_klein", "build_wan", "build_wan22"]

_SEED = 0  # per-component seeds are offsets from it, as in materialize


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
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
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
