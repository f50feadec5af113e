"""Tiny Wan image-to-video bases derived from the built-in ``tiny-wan`` / ``tiny-wan22`` folders.

- ``wan21_i2v``: Wan 2.1 I2V-14B-like ``WanImageToVideoPipeline``: the transformer gets the image
  cross-attention (``image_dim`` = the CLIP vision width, ``added_kv_proj_dim`` = the inner width, so
  each block has ``attn2.add_k_proj``/``add_v_proj``/``norm_added_k`` and the model an
  ``image_embedder``), 36 input channels (16 noise + 4 mask + 16 image latents, as released), and a
  2-layer ``CLIPVisionModel`` + ``CLIPImageProcessor``;
- ``wan22_i2v``: Wan 2.2 I2V-A14B-like: two experts with 36 input channels and no image encoder
  (its transformers have no image cross-attention).

Every weight the T2V built-in has is kept; the new ones (patch embedding, image modules, CLIP) are
seeded random, so the folders are deterministic. Returned: the saved pipeline folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lorarecipe.builtin.materialize import builtin_base_path

IMAGE_DIM = 16  # the tiny CLIP vision width = the transformer's image_dim


def _i2v_transformer(t2v: Any, seed: int, image: bool) -> Any:
    from diffusers import WanTransformer3DModel

    config = {k: v for k, v in dict(t2v.config).items() if not k.startswith("_")}
    config["in_channels"] = 36
    if image:
        config["image_dim"] = IMAGE_DIM
        config["added_kv_proj_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config)
    kept = {k: v for k, v in t2v.state_dict().items() if not k.startswith("patch_embedding.")}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    assert not unexpected and all("patch_embedding" in k or "image" in k or "add" in k for k in missing)
    return model


def _clip_vision(seed: int) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=IMAGE_DIM,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=IMAGE_DIM,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModel(config), processor


def _save(folder: Path, builtin: str, experts: int) -> Path:
    from diffusers import WanImageToVideoPipeline, WanPipeline

    t2v = WanPipeline.from_pretrained(str(builtin_base_path(builtin)))
    image = experts == 1
    encoder, processor = _clip_vision(71) if image else (None, None)
    pipe = WanImageToVideoPipeline(
        tokenizer=t2v.tokenizer,
        text_encoder=t2v.text_encoder,
        vae=t2v.vae,
        scheduler=t2v.scheduler,
        image_processor=processor,
        image_encoder=encoder,
        transformer=_i2v_transformer(t2v.transformer, 72, image),
        transformer_2=_i2v_transformer(t2v.transformer_2, 73, image) if experts == 2 else None,
        boundary_ratio=t2v.config.boundary_ratio,
    )
    pipe.save_pretrained(folder)
    if image:  # as released (without torchvision, transformers saves its PIL fallback class's name)
        index = json.loads((folder / "model_index.json").read_text())
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def wan21_i2v(folder: Path) -> Path:
    """A Wan 2.1 I2V-14B-like folder at ``folder`` (module docstring)."""
    return _save(folder, "tiny-wan", 1)


def wan22_i2v(folder: Path) -> Path:
    """A Wan 2.2 I2V-A14B-like folder at ``folder`` (module docstring)."""
    return _save(folder, "tiny-wan22", 2)
