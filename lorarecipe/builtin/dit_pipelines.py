"""Built-in tiny DiT pipelines from configs: Qwen-Image, Z-Image and SD 3 (random weights, offline).

Each builder returns a fresh fp32 CPU pipeline whose every component comes from a small config and a
fixed seed, with the text encoder of the real model at toy size and a tokenizer built in code:

- ``tiny-qwen-image``: ``QwenImageTransformer2DModel`` (2 joint blocks of width 32), the 3-D causal
  ``AutoencoderKLQwenImage``, a 2-layer ``Qwen2_5_VLForConditionalGeneration`` (its vision tower at
  depth 1, unused by text-to-image) and an offline ``Qwen2Tokenizer`` in which Qwen-Image's prompt
  template is the 34 tokens the pipeline drops;
- ``tiny-z-image``: ``ZImageTransformer2DModel`` (2 layers, 1 noise + 1 context refiner), FLUX's VAE
  layout, a 2-layer ``Qwen3Model`` and the same tokenizer with Qwen3's chat template;
- ``tiny-sd3``: ``SD3Transformer2DModel`` as SD 3.5 Medium is built (2 joint blocks, the first with the
  second attention, RMS q/k norms, the last block's context stream pre-only), two CLIP encoders with
  projection and a T5 encoder.

64 px images are 16×16 latents in every one (VAE factor 4) and 8×8 tokens after 2×2 patches.
"""

from __future__ import annotations

from typing import Any

import torch

from .qwen_tokenizer import build_qwen_tokenizer

__all__ = ["build_qwen_image", "build_sd3", "build_z_image"]

_SEED = 100  # component seeds are _SEED + an offset, independent of the other built-ins'


def _flow_scheduler(**config: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def build_qwen_image() -> Any:
    """Qwen-Image-like pipeline (see the module docstring)."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = build_qwen_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start", "vision_end")}
    torch.manual_seed(_SEED + 1)
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
    torch.manual_seed(_SEED + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    torch.manual_seed(_SEED + 3)
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
    torch.manual_seed(_SEED + 11)
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
    torch.manual_seed(_SEED + 12)
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    torch.manual_seed(_SEED + 13)
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
    torch.manual_seed(_SEED + 21)
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
    torch.manual_seed(_SEED + 22)
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    torch.manual_seed(_SEED + 23)
    text_encoder = CLIPTextModelWithProjection(_clip_config(len(tok), tok))
    torch.manual_seed(_SEED + 24)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(tok_2), tok_2))
    torch.manual_seed(_SEED + 25)
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
