"""The built-in ``tiny-chroma``: a Chroma-like pipeline from configs (random, offline, deterministic).

Chroma is FLUX.1-schnell's transformer without per-block modulation (``ChromaTransformer2DModel``:
its shifts and scales come from one small MLP, the ``distilled_guidance_layer``), a T5 encoder alone,
FLUX.1's VAE and scheduler. Here: 2 double + 2 single blocks of width 32 as in ``tiny-flux``, a 2-layer
approximator of width 32, the tiny T5 and VAE of :mod:`.tiny_components`; 64 px images are 16×16
latents packed into 8×8 tokens.
"""

from __future__ import annotations

from typing import Any

from .tiny_components import flux_flow_scheduler, seeded, tiny_t5_encoder, tiny_vae
from .tokenizer import build_t5_tokenizer

__all__ = ["build_chroma"]

_SEED = 0  # component seeds are _SEED + an offset of their own, independent of the other built-ins'


def build_chroma() -> Any:
    """Chroma-like ``ChromaPipeline`` (see the module docstring)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    tok = build_t5_tokenizer()
    transformer = seeded(
        _SEED + 141,
        ChromaTransformer2DModel,
        patch_size=1,
        in_channels=16,  # 4 latent channels × 2×2 packing
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=2,
    )
    vae = seeded(_SEED + 142, tiny_vae, (0.0609, 1.5035))  # FLUX.1's VAE shift and scaling
    text_encoder = seeded(_SEED + 143, tiny_t5_encoder, tok)
    return ChromaPipeline(
        scheduler=flux_flow_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )
