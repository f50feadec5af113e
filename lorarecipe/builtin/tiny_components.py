"""Toy-width components shared by the built-in pipelines of ``materialize`` (SD, SDXL, FLUX.1) and
``dit_pipelines`` (Qwen-Image, Z-Image, SD 3, FLUX.2, Wan).

Input: a seed and a builder, a tokenizer, or a family's VAE settings. Output: a fresh fp32 CPU module
(or config, or scheduler) from a fixed config, so one tiny CLIP, T5 or VAE is spelled once and every
built-in that has one gets the same. The weights a module gets depend only on the seed set right before
it is built (:func:`seeded`), so the order of the builders stays as it is in each pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch

__all__ = ["flux_flow_scheduler", "seeded", "tiny_clip_config", "tiny_t5_encoder", "tiny_vae"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


def seeded(seed: int, build: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Seed the global torch RNG, then ``build(*args, **kwargs)``: a component's random weights depend
    on its own seed only, not on what was built before it."""
    torch.manual_seed(seed)
    return build(*args, **kwargs)


def tiny_vae(flow_factors: tuple[float, float] | None = None) -> Any:
    """Three blocks: 4× downsampling, so 64 px images are 16×16 latents (a 2-block VAE gives 32×32
    latents, and 1024-token self-attention made a demo grid take over a minute on 2 CPU cores).
    Without ``flow_factors`` SD's VAE (quant convs, default scaling); with ``(shift, scaling)`` the
    flow-matching models' one (FLUX.1, SD 3, Z-Image: no quant convs, these shift and scaling factors)."""
    from diffusers import AutoencoderKL

    flow: dict[str, Any] = {}
    if flow_factors is not None:
        shift_factor, scaling_factor = flow_factors
        flow = {
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "shift_factor": shift_factor,
            "scaling_factor": scaling_factor,
        }
    return AutoencoderKL(
        block_out_channels=(32, 32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        **flow,
    )


def tiny_clip_config(tok: Any) -> Any:
    """CLIP tokenizer -> a 2-layer, 32-wide ``CLIPTextConfig`` over its vocabulary and special tokens
    (with a 32-wide projection, for ``CLIPTextModelWithProjection``)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def tiny_t5_encoder(tok: Any, *, umt5: bool = False) -> Any:
    """T5 tokenizer -> a 2-layer, 32-wide ``T5EncoderModel`` (FLUX.1, SD 3), or ``UMT5EncoderModel``
    (Wan) with the same config, over the tokenizer's vocabulary."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config, model = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    return model(
        config(
            vocab_size=len(tok),
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


def flux_flow_scheduler() -> Any:
    """FLUX.1's and FLUX.2's flow-matching Euler scheduler: shift 3, dynamic shifting by resolution."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
