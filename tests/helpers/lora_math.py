"""An independent reading of LoRA files: the delta each one adds to each base weight.

This deliberately shares no code with lorarecipe or diffusers' converters: keys are parsed with
regular expressions here, alpha comes from the file (kohya ``.alpha`` tensors, PEFT
``lora_adapter_metadata``, or alpha = rank for the old layouts), and
``delta = alpha / rank · up @ down`` is computed in float64.

FLUX.1 files in Black Forest Labs' names (kohya ``lora_unet_double_blocks_0_img_attn_qkv``,
ai-toolkit ``diffusion_model.double_blocks.0.img_attn.qkv``, XLabs ``processor.qkv_lora1``) are read
with this module's own table of the BFL layout: a fused weight's delta ``alpha/rank · up @ down`` is
split by rows onto the diffusers modules it holds (``qkv`` = to_q | to_k | to_v, ``linear1`` = to_q |
to_k | to_v | proj_mlp, heights read from the base's weights), and ``final_layer.adaLN_modulation.1``
has its two row halves swapped (BFL shift|scale, diffusers scale|shift).

The DiT families' other layouts: kohya ``lora_unet_`` names on a transformer base, ai-toolkit's
``diffusion_model.<diffusers name>.lora_A``, DiffSynth-Studio's ``<name>.lora_A.default.weight`` and bare
``<name>.lora_down.weight`` + ``.alpha`` (Qwen-Image, Z-Image); SD 3's original MMDiT names
(``joint_blocks_0_x_block_attn_qkv``: fused q/k/v; the last block's context adaLN halves swapped when
the weight is twice as tall as wide) and Z-Image's (``layers_0_attention_qkv``, ``attention_out``),
each with this module's own table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorarecipe.outputs.safetensors_meta import read_metadata

_PEFT = re.compile(r"^(unet|text_encoder|text_encoder_2|transformer)\.(.+)\.lora_(A|B)\.weight$")
_OLD = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora\.(down|up)\.weight$")
_PROCS = re.compile(r"^(?:unet\.)?(.+)\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$")
_KOHYA = re.compile(
    r"^(lora_unet|lora_te|lora_te1|lora_te2)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$"
)
_KOHYA_COMPONENT = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}


def read_component_weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    """All tensors of one component of a diffusers folder (any *.safetensors file in it)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted((folder / component).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


_BFL_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
    "processor_qkv_lora1": ("attn.to_q", "attn.to_k", "attn.to_v"),  # XLabs
    "processor_qkv_lora2": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "processor_proj_lora1": ("attn.to_out.0",),
    "processor_proj_lora2": ("attn.to_add_out",),
}
_BFL_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
_BFL_TOP = {"final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear"}
_ROLES = r"\.(?P<role>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|down\.weight|up\.weight|alpha)$"
_BFL_KEY = re.compile(
    r"^(?:lora_unet_|diffusion_model\.)?(?P<stem>(?:double_blocks|single_blocks)[._]\d+[._].+|final_layer[._].+)"
    + _ROLES
)

# SD 3's original MMDiT names (kohya sd-scripts): joint block part -> diffusers modules of
# transformer_blocks.N; the context stream's adaLN of the last (pre-only) block is stored shift|scale
# (twice as tall as wide), the others as they are. The final layer is FLUX.1's (read by _BFL_TOP).
_SD3_BLOCK = {
    "x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block_attn_proj": ("attn.to_out.0",),
    "context_block_attn_proj": ("attn.to_add_out",),
    "x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block_attn2_proj": ("attn2.to_out.0",),
    "x_block_adaLN_modulation_1": ("norm1.linear",),
    "context_block_adaLN_modulation_1": ("norm1_context.linear",),
    "x_block_mlp_fc1": ("ff.net.0.proj",),
    "x_block_mlp_fc2": ("ff.net.2",),
    "context_block_mlp_fc1": ("ff_context.net.0.proj",),
    "context_block_mlp_fc2": ("ff_context.net.2",),
}
_SD3_TOP = {
    "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
    "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
}
_SD3_KEY = re.compile(
    r"^lora_unet_(?P<stem>joint_blocks_\d+_.+|[ty]_embedder_mlp_\d|context_embedder)" + _ROLES
)
# Z-Image's original names (musubi's ComfyUI layout): fused attention.qkv, attention.out, the embedder and
# final layer without diffusers' patch-size key; every other module is named as diffusers names it
_ZIMAGE_KEY = re.compile(
    r"^lora_unet_(?P<stem>(?:layers|noise_refiner|context_refiner)_\d+_attention_(?:qkv|out)|x_embedder"
    r"|final_layer_linear|final_layer_adaLN_modulation_1)" + _ROLES
)
_ZIMAGE_TOP = {
    "x_embedder": "all_x_embedder.2-1",
    "final_layer_linear": "all_final_layer.2-1.linear",
    "final_layer_adaLN_modulation_1": "all_final_layer.2-1.adaLN_modulation.1",
}


def _bfl_targets(stem: str) -> tuple[list[str], bool] | None:
    """A BFL module name (dots or underscores) -> (its diffusers modules, halves swapped)."""
    flat = stem.replace(".", "_")
    if m := re.fullmatch(r"double_blocks_(\d+)_(.+)", flat):
        parts = _BFL_DOUBLE.get(m[2])
        return ([f"transformer_blocks.{m[1]}.{p}" for p in parts], False) if parts else None
    if m := re.fullmatch(r"single_blocks_(\d+)_(.+)", flat):
        parts = _BFL_SINGLE.get(m[2])
        return ([f"single_transformer_blocks.{m[1]}.{p}" for p in parts], False) if parts else None
    if flat in _BFL_TOP:
        return [_BFL_TOP[flat]], flat.endswith("adaLN_modulation_1")
    return None


def _sd3_targets(stem: str) -> tuple[list[str], bool] | None:
    """An SD 3 original module name -> (its diffusers modules, halves swapped when 2× as tall as wide)."""
    if m := re.fullmatch(r"joint_blocks_(\d+)_(.+)", stem):
        parts = _SD3_BLOCK.get(m[2])
        return (
            ([f"transformer_blocks.{m[1]}.{p}" for p in parts], m[2] == "context_block_adaLN_modulation_1")
            if parts
            else None
        )
    return ([_SD3_TOP[stem]], False) if stem in _SD3_TOP else None


def _zimage_targets(stem: str) -> tuple[list[str], bool] | None:
    """A Z-Image original name -> its diffusers modules (never swapped)."""
    if stem in _ZIMAGE_TOP:
        return [_ZIMAGE_TOP[stem]], False
    m = re.fullmatch(r"(layers|noise_refiner|context_refiner)_(\d+)_attention_(qkv|out)", stem)
    assert m is not None
    parts = ("to_q", "to_k", "to_v") if m[3] == "qkv" else ("to_out.0",)
    return [f"{m[1]}.{m[2]}.attention.{p}" for p in parts], False


def _table_factors(
    tensors: dict[str, torch.Tensor],
    transformer: Mapping[str, torch.Tensor],
    pattern: re.Pattern[str],
    targets_of: Callable[[str], tuple[list[str], bool] | None],
    pair_swap: bool = False,
) -> dict[tuple[str, str], LoraFactors]:
    """Consume the keys of ``tensors`` named in an original layout -> factors per diffusers base weight:
    a fused weight's rows split onto its modules (heights from the base), halves swapped where the table
    says (``pair_swap``: only when the weight is twice as tall as wide)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key in list(tensors):
        m = pattern.match(key)
        found = targets_of(m["stem"]) if m is not None else None
        if m is None or found is None or any(f"{t}.weight" not in transformer for t in found[0]):
            continue  # another layout's name (Z-Image's t_embedder is not SD 3's)
        role = {"alpha": "alpha"}.get(
            m["role"], "down" if m["role"].startswith(("lora_down", "lora_A", "down")) else "up"
        )
        groups.setdefault(m["stem"], {})[role] = tensors.pop(key)
    factors: dict[tuple[str, str], LoraFactors] = {}
    for stem, p in groups.items():
        targets, swapped = targets_of(stem)  # type: ignore[misc]
        rank = p["down"].shape[0]
        alpha = float(p["alpha"]) if "alpha" in p else float(rank)
        up = p["up"]
        if pair_swap:
            swapped = swapped and up.shape[0] == 2 * p["down"].shape[1]
        if swapped:
            half = up.shape[0] // 2
            up = torch.cat([up[half:], up[:half]])
        start = 0
        for target in targets:
            key = f"{target}.weight"
            height = transformer[key].shape[0]
            factors[("transformer", key)] = LoraFactors(p["down"], up[start : start + height], alpha, rank)
            start += height
        assert start == up.shape[0], f"{stem}: rows {up.shape[0]} do not split into {targets}"
    return factors


def _base_key(component_keys: Iterable[str], module: str, flat: bool) -> str | None:
    keys = set(component_keys)
    if flat:
        table = {}
        for key in keys:
            if key.endswith(".weight"):
                name = key[: -len(".weight")]
                table[name.replace(".", "_")] = key
                if name.startswith("text_model."):
                    table[name[len("text_model.") :].replace(".", "_")] = key
                else:
                    table["text_model_" + name.replace(".", "_")] = key
        return table.get(module)
    for candidate in (
        f"{module}.weight",
        f"text_model.{module}.weight",
        f"{module.removeprefix('text_model.')}.weight",
    ):
        if candidate in keys:
            return candidate
    return None


@dataclass(frozen=True)
class LoraFactors:
    """One module of a LoRA file as stored: ``down`` (A) ``[r, in]`` or ``[r, in, 1, 1]``, ``up`` (B)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    rank: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """alpha / rank · up @ down in float64, shaped like the base weight."""
        return (self.scale * (self.up.double().flatten(1) @ self.down.double().flatten(1))).reshape(shape)


_AITK = re.compile(r"^diffusion_model\.(.+)\.lora_(A|B)\.weight$")  # ai-toolkit/ComfyUI, diffusers names
_DEFAULT = re.compile(r"^(.+)\.lora_(A|B)\.default\.weight$")  # DiffSynth-Studio's PEFT keys
_BARE = re.compile(r"^(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")  # kohya suffixes, no prefix


def lora_factors(
    path: Path, base: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[tuple[str, str], LoraFactors]:
    """(component, base weight key) -> the file's factors and alpha, for the components in ``base``."""
    tensors = load_file(str(path))
    bfl: dict[tuple[str, str], LoraFactors] = {}
    if "transformer" in base:
        transformer = base["transformer"]
        bfl.update(_table_factors(tensors, transformer, _SD3_KEY, _sd3_targets, pair_swap=True))
        bfl.update(_table_factors(tensors, transformer, _ZIMAGE_KEY, _zimage_targets))
        bfl.update(_table_factors(tensors, transformer, _BFL_KEY, _bfl_targets))
    denoiser = "unet" if "unet" in base or "transformer" not in base else "transformer"
    meta = read_metadata(path)
    peft_meta = json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else {}
    parts: dict[tuple[str, str, bool], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if m := _PEFT.match(key):
            parts.setdefault((m[1], m[2], False), {})["down" if m[3] == "A" else "up"] = tensor
        elif m := _OLD.match(key):
            parts.setdefault((m[1], m[2], False), {})[m[3]] = tensor
        elif m := _PROCS.match(key):
            proj = "to_out.0" if m[2] == "to_out" else m[2]
            parts.setdefault(("unet", f"{m[1]}.{proj}", False), {})[m[3]] = tensor
        elif m := _KOHYA.match(key):
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m[3]]
            component = denoiser if m[1] == "lora_unet" else _KOHYA_COMPONENT[m[1]]
            parts.setdefault((component, m[2], True), {})[role] = tensor
        elif (m := _AITK.match(key)) or (m := _DEFAULT.match(key)):
            parts.setdefault(("transformer", m[1], False), {})["down" if m[2] == "A" else "up"] = tensor
        elif m := _BARE.match(key):
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m[2]]
            parts.setdefault(("transformer", m[1], False), {})[role] = tensor
        else:
            raise AssertionError(f"unexpected key {key}")
    factors: dict[tuple[str, str], LoraFactors] = {}
    for (component, module, flat), p in parts.items():
        if component not in base:
            continue  # the caller only checks some components
        rank = p["down"].shape[0]
        if "alpha" in p:
            alpha = float(p["alpha"])
        elif peft_meta:
            # diffusers writes pattern keys anchored ('^module'): both spellings name the module
            alphas = peft_meta.get(f"{component}.alpha_pattern", {})
            ranks = peft_meta.get(f"{component}.rank_pattern", {})
            alpha = float(alphas.get(module, alphas.get(f"^{module}", peft_meta[f"{component}.lora_alpha"])))
            rank = int(ranks.get(module, ranks.get(f"^{module}", rank)))
        else:
            alpha = float(rank)
        key = _base_key(base[component].keys(), module, flat)
        assert key is not None, f"{path.name}: no base weight for {component}.{module}"
        factors[(component, key)] = LoraFactors(p["down"], p["up"], alpha, rank)
    return {**factors, **bfl}


def lora_deltas(
    path: Path, base: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[tuple[str, str], torch.Tensor]:
    """(component, base weight key) -> float64 delta of one LoRA file at weight 1."""
    return {key: f.delta(base[key[0]][key[1]].shape) for key, f in lora_factors(path, base).items()}


def expected_fused(
    base: Mapping[str, Mapping[str, torch.Tensor]], loras: Iterable[tuple[Path, float]], lora_scale: float
) -> dict[tuple[str, str], torch.Tensor]:
    """W + lora_scale · Σ wᵢ · (αᵢ/rᵢ) · BᵢAᵢ for every weight some LoRA touches (float64)."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    for path, weight in loras:
        for key, delta in lora_deltas(path, base).items():
            out[key] = out.get(key, torch.zeros_like(delta)) + weight * delta
    return {key: base[key[0]][key[1]].double() + lora_scale * total for key, total in out.items()}


def tensor_keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())
