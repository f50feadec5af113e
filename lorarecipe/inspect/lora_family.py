"""LoRA modules -> the family they were made for, from shapes only (never ``ss_*`` metadata, which
trainers get wrong), and a sentence saying why.

UNets by their cross-attention input width (768 SD 1.x, 1024 SD 2.x, 2048 SDXL); DiTs by module names
and widths: FLUX.1 (BFL blocks, width 3072, a ×4 GELU MLP, per-block modulation), FLUX.2 (fused
single-block projection, SwiGLU feed-forward, shared modulation, widths 3072/4096/6144), Qwen-Image
(image/text MLPs, 60 joint blocks), Z-Image (NextDiT layers and refiners; Lumina Image 2.0 shares the
names at width 2304), SD 3 (joint blocks of width 1536/2432), Wan (``blocks.N`` with self/cross
attention and a feed-forward), Chroma (its ``distilled_guidance_layer``; a Chroma LoRA without it has
FLUX.1's names and shapes, and is called FLUX.1, which a Chroma base reads). A FLUX.1 LoRA and a FLUX.2
Klein 4B LoRA can share every name and shape (width 3072, attention only, blocks 0-4): such a file is
left undecided. ``lora_variant`` names the model of a family a LoRA was made for, by its width (Klein 4B
or 9B, Wan 1.3B or 14B). Conservative: tiny test models and unknown architectures give None, so a
mismatch is only reported on evidence (names no other family uses count as evidence at any width).
Pure Python.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..families import Family, Variant, family_label

if TYPE_CHECKING:
    from .lora_keys import LoraModule

__all__ = ["detect_family", "lora_variant", "variant_of_widths"]

_CROSS_WIDTHS = {
    768: ("sd1", "SD 1.x text encoder"),
    1024: ("sd2", "SD 2.x text encoder"),
    2048: ("sdxl", "SDXL text encoders"),
}


def detect_family(
    modules: list[LoraModule] | tuple[LoraModule, ...], *, single_te: bool = False
) -> tuple[str | None, str]:
    """Modules -> (family or None, a sentence saying why). Shapes only; conservative.

    ``single_te``: the file uses kohya's ``lora_te_`` prefix, which only SD 1.x/2.x LoRAs use."""
    flat = [(m, m.name.replace(".", "_")) for m in modules]
    dit = [(m, f) for m, f in flat if m.component == "transformer"]
    if dit:
        return _dit_family(dit)
    unet = [(m, f) for m, f in flat if m.component == "unet"]
    found = _unet_family(unet) if unet else None
    if found:
        return found
    te2 = {m.in_features for m, f in flat if m.component == "text_encoder_2" and re.search(r"[qkv]_proj$", f)}
    if te2 == {1280}:
        return "sdxl", "a second text encoder of width 1280 (CLIP ViT-bigG, SDXL) and no denoiser evidence"
    te_width = {
        m.in_features for m, f in flat if m.component == "text_encoder" and re.search(r"[qkv]_proj$", f)
    }
    if (single_te or unet) and len(te_width) == 1 and next(iter(te_width)) in (768, 1024):
        width = next(iter(te_width))
        family = "sd1" if width == 768 else "sd2"
        return family, f"single text encoder of width {width} ({family_label(family)})"
    return None, "no shape evidence for a known family (e.g. a tiny test model or another architecture)"


_FLUX2 = re.compile(r"to_qkv_mlp_proj|ff(?:_context)?_linear_(?:in|out)|(?:double|single)_stream_modulation")
_QWEN = re.compile(r"transformer_blocks_\d+_(?:img|txt)_(?:mlp|mod)")
_NEXTDIT = re.compile(
    r"(?:layers|noise_refiner|context_refiner)_\d+_(?:attention_(?:to_[qkv]|to_out_0|qkv|out)|feed_forward_w[123]"
    r"|adaLN_modulation_0)$"
)
_LUMINA2_WIDTH = 2304
_BFL_MLP = re.compile(r"(?:double_blocks_\d+_(?:img|txt)_mlp_0|single_blocks_\d+_linear1)$")
# modules FLUX.1 has and FLUX.2 has not: per-block modulation, GELU MLPs, separate single-block q/k/v
_FLUX1_ONLY = re.compile(
    r"(?:img|txt)_mod_lin|single_blocks_\d+_modulation_lin|norm1(?:_context)?_linear|ff(?:_context)?_net_"
    r"|single_transformer_blocks_\d+_(?:attn_to_[qkv]|proj_out|proj_mlp|norm_linear)|time_text_embed|vector_in"
)
_WAN = re.compile(
    r"^blocks_\d+_(?:(?:self|cross)_attn_(?:[qkvo]|[kv]_img)|attn[12]_(?:to_[qkv]|to_out_0|add_[kv]_proj)"
    r"|ffn_(?:0|2|net_0_proj|net_2))$"
)
_KLEIN_4B_BLOCKS = (5, 20)  # double, single blocks of FLUX.2 Klein 4B, the FLUX.2 model as wide as FLUX.1


def _bfl_mlp_family(dit: list[tuple[LoraModule, str]]) -> tuple[str, str] | None:
    """FLUX.1 and FLUX.2 share BFL module names; their MLP widths differ (GELU ×4 vs SwiGLU 2×3):
    ``img_mlp.0`` is 4× (FLUX.1) or 6× (FLUX.2) its input, ``linear1`` is 3+4 = 7× or 3+6 = 9×."""
    for module, flat in dit:
        if not _BFL_MLP.search(flat) or module.in_features <= 0:
            continue
        ratio = module.out_features / module.in_features
        linear1 = flat.endswith("linear1")
        if ratio == (7 if linear1 else 4):
            return "flux", f"'{module.name}' {module.in_features}→{module.out_features} (FLUX.1 MLP ratio)"
        if ratio == (9 if linear1 else 6):
            return "flux2", f"'{module.name}' {module.in_features}→{module.out_features} (FLUX.2 SwiGLU MLP)"
    return None


def _flux1_or_klein(dit: list[tuple[LoraModule, str]], example: str) -> tuple[str | None, str]:
    """A width-3072 BFL-style LoRA without MLP evidence: FLUX.1 when a FLUX.1-only module or a block
    beyond FLUX.2 Klein 4B's (5 double, 20 single) shows it, else undecided (both fit its names)."""
    only = next((m.name for m, f in dit if _FLUX1_ONLY.search(f)), None)
    if only is not None:
        return "flux", f"'{only}' (a FLUX.1 module) with hidden width 3072"
    for module, flat in dit:
        found = re.match(
            r"(double_blocks|transformer_blocks|single_blocks|single_transformer_blocks)_(\d+)_", flat
        )
        limit = _KLEIN_4B_BLOCKS[0 if found and found[1] in ("double_blocks", "transformer_blocks") else 1]
        if found and int(found[2]) >= limit:
            return (
                "flux",
                f"'{module.name}' with hidden width 3072 (FLUX.2 Klein 4B has fewer blocks: FLUX.1)",
            )
    if any(m.in_features != 3072 or m.out_features not in (3072, 9216) for m, _ in dit):
        return "flux", f"'{example}' with hidden width 3072 (FLUX.1; its shapes do not fit FLUX.2 Klein 4B)"
    return None, (
        f"'{example}' with hidden width 3072 and attention only: FLUX.1 and FLUX.2 Klein 4B share these "
        "names and shapes"
    )


def _dit_family(dit: list[tuple[LoraModule, str]]) -> tuple[str | None, str]:
    widths = {w for m, _ in dit for w in (m.in_features, m.out_features)}
    heads = {re.split(r"_\d", f, maxsplit=1)[0] for _, f in dit}
    flux_blocks = heads & {"single_transformer_blocks", "double_blocks", "single_blocks"}
    chroma = next((m.name for m, f in dit if f.startswith("distilled_guidance_layer_")), None)
    if chroma is not None:
        return "chroma", f"'{chroma}' (Chroma's distilled guidance layer)"
    flux2 = next((m.name for m, f in dit if _FLUX2.search(f)), None)
    if flux2 is not None:
        return "flux2", f"'{flux2}' (a FLUX.2 module: fused single-block projection or SwiGLU feed-forward)"
    wan = next((m.name for m, f in dit if _WAN.match(f)), None)
    if wan is not None:
        return "wan", f"'{wan}' (Wan: numbered blocks with self/cross attention and a feed-forward)"
    qwen = next((m.name for m, f in dit if _QWEN.match(f)), None)
    last_joint = max(
        (int(f.split("_")[2]) for _, f in dit if re.match(r"transformer_blocks_\d+_", f)), default=-1
    )
    if qwen is None and 3072 in widths and last_joint >= 19 and not flux_blocks:
        qwen = next(m.name for m, f in dit if f.startswith(f"transformer_blocks_{last_joint}_"))
    if qwen is not None:
        return "qwen_image", f"'{qwen}' (Qwen-Image: 60 joint blocks with image/text MLPs; FLUX.1 has 19)"
    nextdit = next((m for m, f in dit if _NEXTDIT.search(f)), None)
    if nextdit is not None and _LUMINA2_WIDTH in widths:
        return "lumina2", f"'{nextdit.name}' with hidden width {_LUMINA2_WIDTH} (Lumina Image 2.0's NextDiT)"
    if nextdit is not None:
        return "z_image", f"'{nextdit.name}' (Z-Image: NextDiT layers/refiners with a SwiGLU feed_forward)"
    by_mlp = _bfl_mlp_family(dit) if heads & {"double_blocks", "single_blocks"} else None
    if by_mlp is not None:
        return by_mlp
    joint = any(re.search(r"add_[qkv]_proj|to_add_out|ff_context|norm1_context", f) for _, f in dit)
    example = next((m.name for m, f in dit if f.startswith(tuple(flux_blocks or heads))), dit[0][0].name)
    flux_like = flux_blocks or ("transformer_blocks" in heads and joint)
    if flux_like and widths & {4096, 6144} and not widths & {3072}:
        return "flux2", f"'{example}' with hidden width {min(widths & {4096, 6144})} (FLUX.2 dev or Klein 9B)"
    if 3072 in widths and flux_like:
        return _flux1_or_klein(dit, example)
    sd3_width = widths & {1536, 2432}
    mmdit = ("transformer_blocks" in heads and joint) or "joint_blocks" in heads
    if sd3_width and not flux_blocks and mmdit:
        return "sd3", f"'{example}' with joint-attention width {min(sd3_width)} (SD 3 / 3.5)"
    return None, (
        f"transformer LoRA ('{example}', widths {sorted(widths)[:6]}) matches no known family "
        "(e.g. a tiny test model or an unsupported architecture)"
    )


def _unet_family(unet: list[tuple[LoraModule, str]]) -> tuple[str | None, str] | None:
    cross = {m.in_features for m, f in unet if re.search(r"attn2_to_[kv]$", f)}
    known = {w for w in cross if w in _CROSS_WIDTHS}
    if len(known) == 1 and known == cross:
        width = next(iter(known))
        family, why = _CROSS_WIDTHS[width]
        return family, f"attn2.to_k input width {width} ({why})"
    if cross:
        return None, f"cross-attention input widths {sorted(cross)} match no known family (tiny test model?)"
    if any(re.search(r"transformer_blocks_[1-9]", f) for _, f in unet):
        return "sdxl", "UNet transformer_blocks.1+ present (SDXL stacks 2-10 transformer layers per block)"
    widths = {m.in_features for m, _ in unet} & set(_CROSS_WIDTHS)
    if len(widths) == 1:
        width = next(iter(widths))
        family, why = _CROSS_WIDTHS[width]
        return family, f"a UNet module with input width {width} (cross-attention from the {why})"
    return None


def variant_of_widths(family: Family, widths: set[int]) -> Variant | None:
    """The one variant of ``family`` whose hidden width is among ``widths`` (None when none or several)."""
    found = [v for v in family.variants if v.width in widths]
    return found[0] if len(found) == 1 else None


def lora_variant(family: Family, modules: list[LoraModule] | tuple[LoraModule, ...]) -> Variant | None:
    """The model of ``family`` a LoRA was made for, from its denoiser modules' input widths (attention
    reads the hidden width; no other input of these models is as wide as a sibling's hidden width):
    FLUX.2 dev / Klein 4B / Klein 9B, Wan 1.3B / 5B / 14B."""
    return variant_of_widths(family, {m.in_features for m in modules if m.component in family.denoisers})
