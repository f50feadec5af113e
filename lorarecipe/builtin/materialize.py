"""Build the built-in tiny pipelines and LoRAs from configs, and materialize them in the cache.

Input: a name from :mod:`lorarecipe.builtin.catalog`. Output: a folder that
``DiffusionPipeline.from_pretrained`` loads (bases) or one ``.safetensors`` file (LoRAs), under
``cache_root()/builtin/v{BUILTIN_VERSION}/``. Everything is random weights from a fixed seed, built
offline on CPU in fp32, so the bytes are the same on every run; nothing here may touch the network.

``python -m lorarecipe.builtin.materialize --inventory`` rewrites ``inventory.json`` (tensor names, dtypes
and shapes of every built-in, read by the torch-free static checks).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from filelock import FileLock

from ..errors import InputUnavailableError
from ..families import FAMILIES
from ..fs.atomic import atomic_dir, atomic_file, atomic_write_text, clean_stale_temporaries
from .catalog import (
    BUILTIN_BASES,
    BUILTIN_LORAS,
    BUILTIN_VERSION,
    builtin_base_dir,
    builtin_lora_file,
    builtin_root,
    materialized_base,
    materialized_lora,
)
from .chroma_pipeline import build_chroma
from .dit_loras import FLUX2_WAN_PEFT_TARGETS, default_selection, make_dit_lora, make_original_lora
from .dit_pipelines import (
    build_flux2,
    build_flux2_klein,
    build_qwen_image,
    build_sd3,
    build_wan,
    build_wan22,
    build_z_image,
)
from .flux_loras import FLUX_PEFT_TARGETS, make_flux_lora
from .loras import canonicalize_safetensors, make_kohya_lora, make_peft_lora
from .tiny_components import flux_flow_scheduler, seeded, tiny_clip_config, tiny_t5_encoder, tiny_vae
from .tokenizer import build_clip_tokenizer, build_t5_tokenizer

__all__ = [
    "build_base_pipeline",
    "builtin_base_path",
    "builtin_lora_path",
    "builtin_root",
    "generate_inventory",
    "main",
    "materialize_all",
    "read_safetensors_header",
]

_BASE_SEED = 0  # per-component seeds are _BASE_SEED + a fixed offset, so components are order-independent
_INVENTORY = Path(__file__).with_name("inventory.json")


def _unknown(kind: str, name: str, known: Sequence[str]) -> InputUnavailableError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    return InputUnavailableError(f"unknown built-in {kind} {name!r}; {hint}")


def _build_sd() -> StableDiffusionPipeline:
    """SD1.5-like: UNet (32, 64) with 1×1-conv transformer projections, one 2-layer CLIP, DDIM."""
    from transformers import CLIPTextModel

    tok = build_clip_tokenizer()
    unet = seeded(
        _BASE_SEED + 1,
        UNet2DConditionModel,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = seeded(_BASE_SEED + 2, tiny_vae)
    text_encoder = seeded(_BASE_SEED + 3, CLIPTextModel, tiny_clip_config(tok))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl() -> StableDiffusionXLPipeline:
    """SDXL-like: text_time UNet with linear projections, CLIP + CLIP-with-projection, Euler."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = build_clip_tokenizer()
    tok_2 = build_clip_tokenizer()
    unet = seeded(
        _BASE_SEED + 11,
        UNet2DConditionModel,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids × 8 + pooled 32
        cross_attention_dim=64,  # 32 + 32 (both encoders' hidden states are concatenated)
        norm_num_groups=32,
    )
    vae = seeded(_BASE_SEED + 12, tiny_vae)
    text_encoder = seeded(_BASE_SEED + 13, CLIPTextModel, tiny_clip_config(tok))
    text_encoder_2 = seeded(_BASE_SEED + 14, CLIPTextModelWithProjection, tiny_clip_config(tok_2))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_flux() -> FluxPipeline:
    """FLUX.1-dev-like: 2 double + 2 single blocks of width 32 (guidance embedding), CLIP + T5,
    flow-matching Euler with dynamic shifting. 64 px images are 16×16 latents packed into 8×8 tokens."""
    from transformers import CLIPTextModel

    tok, tok_2 = build_clip_tokenizer(), build_t5_tokenizer()
    transformer = seeded(
        _BASE_SEED + 21,
        FluxTransformer2DModel,
        patch_size=1,
        in_channels=16,  # 4 latent channels × 2×2 packing
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    vae = seeded(_BASE_SEED + 22, tiny_vae, (0.0609, 1.5035))
    text_encoder = seeded(_BASE_SEED + 23, CLIPTextModel, tiny_clip_config(tok))
    text_encoder_2 = seeded(_BASE_SEED + 24, tiny_t5_encoder, tok_2)
    return FluxPipeline(
        scheduler=flux_flow_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
        transformer=transformer,
    )


_BUILDERS = {
    "tiny-sd": _build_sd,
    "tiny-sdxl": _build_sdxl,
    "tiny-flux": _build_flux,
    "tiny-qwen-image": build_qwen_image,
    "tiny-z-image": build_z_image,
    "tiny-sd3": build_sd3,
    "tiny-flux2": build_flux2,
    "tiny-flux2-klein": build_flux2_klein,
    "tiny-wan": build_wan,
    "tiny-wan22": build_wan22,
    "tiny-chroma": build_chroma,
}


_DIT_LORA_FAMILIES = ("qwen_image", "z_image", "sd3")  # LoRAs written by dit_loras.make_dit_lora


def build_base_pipeline(name: str) -> DiffusionPipeline:
    """Built-in base name -> a fresh in-memory pipeline (fp32, CPU, eval mode), identical on every call.

    The global torch RNG is reseeded per component and restored afterwards, so callers' RNG state is
    not disturbed.
    """
    spec = BUILTIN_BASES.get(name)
    if spec is None:
        raise _unknown("base", name, list(BUILTIN_BASES))
    with torch.random.fork_rng(devices=[]):
        pipe = _BUILDERS[name]()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as after from_pretrained
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _finish_file(path: Path) -> None:
    """Canonical safetensors header (see ``canonicalize_safetensors``) and ordinary read permissions
    (safetensors writes 0600 files; a shared cache must be readable by every user of it)."""
    if path.suffix == ".safetensors":
        canonicalize_safetensors(path)
    path.chmod(0o644)


def builtin_base_path(name: str) -> Path:
    """Built-in base name -> its pipeline folder, materialized on first use.

    Built under a file lock (one per built-in root, so parallel processes neither race nor duplicate
    work) into a temporary folder that is renamed into place whole: a folder at the final path is
    always complete.
    """
    if name not in BUILTIN_BASES:
        raise _unknown("base", name, list(BUILTIN_BASES))
    final = builtin_base_dir(name)
    if materialized_base(name):
        return final
    with _build_lock():
        if not materialized_base(name):
            pipe = build_base_pipeline(name)
            with atomic_dir(final) as tmp:
                pipe.save_pretrained(tmp, safe_serialization=True)
                for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
                    _finish_file(file)
    return final


def builtin_lora_path(name: str) -> Path:
    """Built-in LoRA name (``"tiny-sd/style"``) -> its ``.safetensors`` file, materialized on first use."""
    spec = BUILTIN_LORAS.get(name)
    if spec is None:
        raise _unknown("LoRA", name, list(BUILTIN_LORAS))
    final = builtin_lora_file(name)
    if materialized_lora(name):
        return final
    with _build_lock():
        if not materialized_lora(name):
            pipe = build_base_pipeline(spec.base)  # only module names and shapes are used
            family = BUILTIN_BASES[spec.base].family
            with atomic_file(final) as tmp:
                common: dict[str, Any] = {"rank": spec.rank, "alpha": spec.alpha, "seed": spec.seed}
                if family in _DIT_LORA_FAMILIES:
                    make_dit_lora(
                        pipe,
                        tmp,
                        family=family,
                        layout=spec.layout,
                        text_encoders=spec.text_encoders,
                        **common,
                    )
                elif spec.layout == "peft" and family in FLUX2_WAN_PEFT_TARGETS:
                    make_peft_lora(
                        pipe, tmp, **common, text_encoders=False, targets=FLUX2_WAN_PEFT_TARGETS[family]
                    )
                elif family in FLUX2_WAN_PEFT_TARGETS:
                    select = default_selection(family, spec.layout)
                    make_original_lora(
                        FAMILIES[family], pipe, tmp, layout=spec.layout, select=select, **common
                    )
                elif spec.layout == "peft" and family == "flux":
                    make_peft_lora(
                        pipe, tmp, **common, text_encoders=spec.text_encoders, targets=FLUX_PEFT_TARGETS
                    )
                elif spec.layout == "peft":
                    make_peft_lora(pipe, tmp, **common, text_encoders=spec.text_encoders)
                elif family == "flux":
                    make_flux_lora(pipe, tmp, layout=spec.layout, text_encoders=spec.text_encoders, **common)
                else:
                    make_kohya_lora(pipe, tmp, text_encoders=spec.text_encoders, **common)
                _finish_file(tmp)
    return final


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """Hold the per-version build lock; stale temporaries of killed builds are removed once it is held."""
    root = builtin_root()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".build.lock")):
        clean_stale_temporaries(root)
        yield


def materialize_all() -> dict[str, Path]:
    """Build every base and LoRA that is not cached yet -> {name: path}."""
    paths = {name: builtin_base_path(name) for name in BUILTIN_BASES}
    paths.update({name: builtin_lora_path(name) for name in BUILTIN_LORAS})
    return paths


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """A ``.safetensors`` file -> its JSON header (tensor entries plus ``__metadata__``), no torch needed."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header: dict[str, Any] = json.loads(handle.read(length))
    return header


def _tensor_table(path: Path) -> dict[str, list[Any]]:
    header = read_safetensors_header(path)
    return {k: [v["dtype"], list(v["shape"])] for k, v in sorted(header.items()) if k != "__metadata__"}


def generate_inventory() -> dict[str, Any]:
    """Materialize every built-in -> {"version", "bases": {name: {component: {key: [dtype, shape]}}},
    "loras": {name: {"tensors": {key: [dtype, shape]}, "metadata": {...}}}}, read from the files' headers."""
    bases: dict[str, Any] = {}
    for name in BUILTIN_BASES:
        root = builtin_base_path(name)
        components: dict[str, Any] = {}
        for file in sorted(root.glob("*/*.safetensors")):
            components[file.parent.name] = _tensor_table(file)
        bases[name] = components
    loras: dict[str, Any] = {}
    for name in BUILTIN_LORAS:
        path = builtin_lora_path(name)
        metadata = read_safetensors_header(path).get("__metadata__", {})
        loras[name] = {"tensors": _tensor_table(path), "metadata": dict(sorted(metadata.items()))}
    return {"version": BUILTIN_VERSION, "bases": bases, "loras": loras}


def inventory_text(inventory: dict[str, Any]) -> str:
    """Inventory -> the exact text committed in ``inventory.json``.

    Sorted keys, nested mappings one entry per line, every leaf (``["F32", [32, 4]]``, a metadata string)
    on one line, so diffs stay readable.
    """

    def dump(value: Any, depth: int) -> str:
        if not isinstance(value, dict) or not value:
            return json.dumps(value, ensure_ascii=False)
        pad = " " * (depth + 1)
        items = [f"{pad}{json.dumps(k)}: {dump(v, depth + 1)}" for k, v in sorted(value.items())]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"

    return dump(inventory, 0) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: materialize every built-in (default) or rewrite ``inventory.json`` (``--inventory``)."""
    parser = argparse.ArgumentParser(prog="python -m lorarecipe.builtin.materialize", description=__doc__)
    parser.add_argument("--inventory", action="store_true", help=f"rewrite {_INVENTORY}")
    args = parser.parse_args(argv)
    if args.inventory:
        atomic_write_text(_INVENTORY, inventory_text(generate_inventory()))
        print(f"wrote {_INVENTORY}")
        return 0
    for name, path in materialize_all().items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
