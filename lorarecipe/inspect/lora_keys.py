"""A LoRA file's header -> :class:`LoraInfo`: key layout, modules, ranks, alphas, family, loadability.

Works from tensor names and shapes only (never values), so it is instant and torch-free. The
family comes from shapes (cross-attention input widths, hidden sizes), never from ``ss_*``
metadata, which trainers get wrong. ``unsupported`` names the reason when diffusers 0.42 cannot
load the file (or would silently load nothing) and lorarecipe does not convert it itself. LyCORIS
(LoCon with ``lora_mid``, LoHa, LoKr) and DoRA files are among those diffusers cannot load, and
lorarecipe applies them itself: for them ``lycoris`` holds every module as its adapter math reads
it (:mod:`.lycoris_keys`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..families import FAMILIES
from ..fs.json_files import JsonFileError, parse_json
from .lora_family import detect_family
from .lora_layouts import (
    COMPONENT_ORDER,
    KOHYA_PREFIXES,
    RAW_PEFT,
    non_float_weights,
    prefix_problem,
)
from .lycoris_keys import LycorisInfo, inspect_lycoris, peft_pattern_matches
from .safetensors_header import SafetensorsHeader, TensorInfo

__all__ = ["COMPONENT_ORDER", "RAW_PEFT", "LoraInfo", "LoraModule", "inspect_lora"]

_UNET_HEADS = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "add_embedding",
    "input_blocks",
    "middle_block",
    "output_blocks",
)
_DIT_HEADS = (
    "single_transformer_blocks",
    "transformer_blocks",
    "double_blocks",
    "single_blocks",
    "joint_blocks",
    "blocks",
    "x_embedder",
    "context_embedder",
    "proj_out",
    "norm_out",
    "time_text_embed",
    "pos_embed",
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "final_layer",
    "layers",  # Z-Image (NextDiT)
    "noise_refiner",
    "context_refiner",
    "all_x_embedder",
    "all_final_layer",
    "cap_embedder",
    "t_embedder",
)

# key -> (kind, stem, role). Order matters: the first pattern that matches wins.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("cloneofsimo", re.compile(r"^((?:unet|text_encoder):\d+):(down|up)$")),
    (
        "attn_procs",
        re.compile(r"^(.+\.(?:to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)_lora)\.(down|up)\.weight$"),
    ),
    ("xlabs", re.compile(r"^(.+\.processor\.(?:qkv|proj)_lora\d?)\.(down|up)\.weight$")),
    ("diffusers_old", re.compile(r"^(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")),
    ("peft", re.compile(r"^(.+)\.lora_(A|B)\.weight$")),
    ("peft", re.compile(r"^(.+)\.lora_(A|B)\.default\.weight$")),  # DiffSynth-Studio (PEFT adapter name)
    ("peft", re.compile(r"^(.+)\.lora_B\.(bias)$")),
    ("peft", re.compile(r"^(.+)\.lora_(magnitude_vector)$")),
    ("kohya", re.compile(r"^(.+)\.lora_(down|up|mid)\.weight$")),
    ("malformed", re.compile(r"^(lora_(?:unet|te\d?)_.+)_lora_(down|up)\.weight$")),
    ("lycoris_lokr", re.compile(r"^(.+)\.(lokr_w[12](?:_[ab])?|lokr_t2)$")),
    ("lycoris_loha", re.compile(r"^(.+)\.(hada_w[12]_[ab]|hada_t[12])$")),
    ("extra", re.compile(r"^(.+)\.(alpha|dora_scale)$")),
)
_ANY_PATTERN = re.compile("|".join(f"(?P<p{i}>{p.pattern})" for i, (_, p) in enumerate(_PATTERNS)))
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_ROLE = {"A": "down", "B": "up", "magnitude_vector": "dora"}
_FAST = (
    (".lora_down.weight", "kohya", "down"),
    (".lora_up.weight", "kohya", "up"),
    (".lora_A.weight", "peft", "down"),
    (".lora_B.weight", "peft", "up"),
    (".alpha", "extra", "alpha"),
)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where it lives, its rank, alpha and the shape it adapts."""

    component: str
    name: str
    rank: int
    alpha: float | None
    in_features: int
    out_features: int
    kernel: tuple[int, ...]


@dataclass(frozen=True)
class LoraInfo:
    """Everything the header says about a LoRA file (see the module docstring)."""

    format: str
    modules: tuple[LoraModule, ...]
    components: tuple[str, ...]
    ranks: tuple[int, ...]
    family: str | None
    family_evidence: str
    alpha_source: str
    unsupported: str | None
    unrecognized_keys: tuple[str, ...]
    metadata: Mapping[str, str] = field(hash=False)
    #: the only problem is the bare-PEFT ``base_model.model.`` prefix, which some families read
    raw_peft: bool = False
    #: LyCORIS/DoRA files: every module as lorarecipe's adapter math reads it (None for plain LoRAs)
    lycoris: LycorisInfo | None = field(default=None, hash=False)


@dataclass
class _Group:
    kind: str
    stem: str
    parts: dict[str, TensorInfo]
    dora: bool = False
    alpha: bool = False


def _guess_component(name: str) -> str:
    head = re.split(r"[._]\d|\.", name, maxsplit=1)[0]
    if head in _UNET_HEADS:
        return "unet"
    if head in _DIT_HEADS:
        return "transformer"
    return "text_encoder" if head == "text_model" else "unknown"


def _split(kind: str, stem: str) -> tuple[str, str]:
    """(kind, stem as in the file) -> (component, module name without the component prefix)."""
    if kind == "cloneofsimo":
        return stem.partition(":")[0], stem.partition(":")[2]
    if kind == "attn_procs":  # old diffusers: '<m>.processor.to_k_lora', TE '<m>.self_attn.to_k_lora'
        component, path = _split("", stem.removesuffix("_lora").replace(".processor.", "."))
        head, _, proj = path.rpartition(".")
        if component.startswith("text_encoder"):
            return component, f"{head}.{_TE_PROJ.get(proj, proj)}"
        return "unet", f"{head}.{'to_out.0' if proj == 'to_out' else proj}"
    for prefix, component in KOHYA_PREFIXES:
        if stem.startswith(prefix):
            rest = stem[len(prefix) :]
            dit = component == "unet" and _guess_component(rest) == "transformer"
            return ("transformer" if dit else component), rest
    for prefix in ("base_model.model.", "diffusion_model."):
        stem = stem.removeprefix(prefix)
    head, _, rest = stem.partition(".")
    if head in COMPONENT_ORDER[:-1] and rest:
        return head, rest
    return _guess_component(stem), stem


def _dims(info: TensorInfo | None, *lengths: int) -> tuple[int, ...] | None:
    if info is None or len(info.shape) not in lengths or 0 in info.shape:
        return None
    return info.shape


_LOCON_MID = "uses LoCon's CP decomposition ('lora_mid'); diffusers cannot load it"


def _lowrank(group: _Group) -> tuple[int, int, int, tuple[int, ...]] | str:
    """(rank, in, out, kernel) of a down/up pair, or a reason the pair is broken."""
    down, up = _dims(group.parts.get("down"), 2, 4), _dims(group.parts.get("up"), 2, 4)
    if "mid" in group.parts:
        return f"module {group.stem!r} {_LOCON_MID}"
    if down is None or up is None:
        return f"module {group.stem!r} has no usable down/A and up/B weight pair"
    if up[1] != down[0]:
        return f"module {group.stem!r}: down rank {down[0]} but up rank {up[1]}"
    return down[0], down[1], up[0], tuple(down[2:])


def _lokr(group: _Group) -> tuple[int, int, int, tuple[int, ...]] | str:
    p = group.parts
    factors: list[tuple[int, int]] = []
    ranks: list[int] = []
    for w in ("lokr_w1", "lokr_w2"):
        full, a, b = _dims(p.get(w), 2, 4), _dims(p.get(f"{w}_a"), 2), _dims(p.get(f"{w}_b"), 2, 4)
        if full is not None:
            factors.append((full[0], full[1]))
        elif a is not None and b is not None:
            factors.append((a[0], b[1]))
            ranks.append(a[1])
        else:
            return f"LoKr module {group.stem!r} lacks its {w} factor"
    w2 = _dims(p.get("lokr_w2"), 4) or _dims(p.get("lokr_t2"), 4)
    out, inp = factors[0][0] * factors[1][0], factors[0][1] * factors[1][1]
    rank = ranks[-1] if ranks else min(factors[0]) * min(factors[1])  # unfactored: the kron's rank bound
    return rank, inp, out, tuple(w2[2:]) if w2 else ()


def _loha(group: _Group) -> tuple[int, int, int, tuple[int, ...]] | str:
    a, b = _dims(group.parts.get("hada_w1_a"), 2), _dims(group.parts.get("hada_w1_b"), 2)
    if a is None or b is None:
        return f"LoHa module {group.stem!r} lacks hada_w1_a/hada_w1_b"
    t1 = _dims(group.parts.get("hada_t1"), 4)
    return a[1], b[1], a[0], tuple(t1[2:]) if t1 else ()


def _classify(key: str) -> tuple[str, str, str] | None:
    """Key -> (kind, stem, role); the common suffixes skip the regular expressions (big files)."""
    for suffix, kind, role in _FAST:
        if key.endswith(suffix) and len(key) > len(suffix):
            return kind, key[: -len(suffix)], role
    first = _ANY_PATTERN.match(key)  # one scan to find which pattern, then that pattern's groups
    if first is None or first.lastgroup is None:
        return None
    kind, pattern = _PATTERNS[int(first.lastgroup[1:])]
    match = pattern.match(key)
    assert match is not None
    return kind, match.group(1), _ROLE.get(match.group(2), match.group(2))


def _group_keys(header: SafetensorsHeader) -> tuple[dict[tuple[str, str], _Group], list[str]]:
    groups: dict[tuple[str, str], _Group] = {}
    extras: list[tuple[str, str, str]] = []
    unrecognized: list[str] = []
    for key, info in header.tensors.items():
        found = _classify(key)
        if found is None:
            unrecognized.append(key)
        elif found[0] == "extra":
            extras.append((key, found[1], found[2]))
        else:
            group = groups.setdefault(found[:2], _Group(found[0], found[1], {}))
            group.parts[found[2]] = info
            group.dora |= found[2] == "dora"
    by_stem = {stem: group for (_, stem), group in groups.items()}
    for key, stem, role in extras:
        owner = by_stem.get(stem)
        if owner is None:
            unrecognized.append(key)
        elif role == "alpha":
            owner.alpha = True
        else:
            owner.dora = True
    return groups, sorted(unrecognized)


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata``: a JSON object of '<component>.<LoraConfig field>'."""
    try:  # invalid metadata is ignored here; loading the file refuses it (diffusers parses it too)
        parsed = parse_json(metadata.get("lora_adapter_metadata", "{}"), "lora_adapter_metadata")
    except JsonFileError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    return float(value) if ok and abs(value) < 1e30 else None


def _metadata_alpha(config: dict[str, Any], component: str, name: str) -> float | None:
    """LoraConfig alpha for one module. alpha_pattern keys are matched as literal module names
    (``peft_pattern_matches``), not as regular expressions: the metadata is untrusted and a regex
    could hang."""
    pattern = config.get(f"{component}.alpha_pattern")
    if isinstance(pattern, dict):
        for key, value in pattern.items():
            if isinstance(key, str) and peft_pattern_matches(key, name) and _number(value) is not None:
                return _number(value)
    return _number(config.get(f"{component}.lora_alpha"))


def _unsupported(
    formats: Counter[str], groups: list[_Group], broken: list[str], control: bool, reads: frozenset[str]
) -> str | None:
    first = {kind: next(g.stem for g in groups if g.kind == kind) for kind in formats}
    if "cloneofsimo" in formats:
        return (
            f"cloneofsimo lora_diffusion layout (keys like '{first['cloneofsimo']}:down'): modules are "
            "numbered in traversal order, not named, so neither diffusers nor lorarecipe can place them"
        )
    if "lycoris_lokr" in formats:
        how = (
            "loads LoKr for this family into PEFT layers, whose alpha convention differs from the file's"
            if "lokr" in reads
            else "cannot load LoKr"
        )
        return (
            f"LyCORIS LoKr (Kronecker) weights (e.g. '{first['lycoris_lokr']}.lokr_w1…'): diffusers 0.42 "
            f"{how} (lorarecipe applies it itself)"
        )
    if "lycoris_loha" in formats:
        return (
            f"LyCORIS LoHa (Hadamard) weights (e.g. '{first['lycoris_loha']}.hada_w1_a'): diffusers 0.42 "
            "cannot load LoHa (lorarecipe applies it itself)"
        )
    if "malformed" in formats:
        stem = first["malformed"]
        doubled = re.match(r"^(lora_(?:unet|te\d?)_(?:unet|text_encoder\d?)_)", stem)
        what = f"the prefix {doubled.group(1)!r} repeats the component and " if doubled else ""
        return (
            f"malformed kohya key '{stem}_lora_down.weight': {what}'_lora_down.weight' should be "
            "'.lora_down.weight' (a broken conversion; re-convert from the original file)"
        )
    if any(g.dora for g in groups):
        dora = next(g.stem for g in groups if g.dora)
        return (
            f"DoRA (dora_scale / lora_magnitude_vector, e.g. on '{dora}'): diffusers 0.42 drops the "
            "magnitude vectors and would apply a different update than the one trained (lorarecipe "
            "applies it itself)"
        )
    if broken:
        return broken[0]
    if len(formats) > 1:
        return f"mixes key layouts {sorted(formats)}; diffusers would load only part of it"
    if not formats:
        return "no LoRA weights recognized (no lora_A/lora_B, lora_down/lora_up or LyCORIS keys)"
    return prefix_problem(next(iter(formats)), [g.stem for g in groups], control, reads)


def _readable_layouts(family: str | None, groups: list[_Group], keys: list[str]) -> frozenset[str]:
    """The base family's ``lora_layouts``, without 'bare' when nothing triggers its converter (no
    ``.alpha`` key and no PEFT ``default.`` adapter name: diffusers would pass the keys through)."""
    known = FAMILIES.get(family or "")
    reads = set(known.lora_layouts) if known is not None else set()
    if not any(g.alpha for g in groups) and not any(".default." in k for k in keys):
        reads.discard("bare")
    return frozenset(reads)


def inspect_lora(header: SafetensorsHeader, family: str | None = None) -> LoraInfo:
    """Header -> LoraInfo. Never raises for odd files: oddities end up in ``unsupported``.

    ``family``: the base's family when known, whose diffusers loader may convert layouts others
    load as nothing (Qwen-Image and Z-Image read ``diffusion_model.`` and bare names)."""
    groups, unrecognized = _group_keys(header)
    config = _peft_alphas(header.metadata)
    readers = {"lycoris_lokr": _lokr, "lycoris_loha": _loha}
    modules: list[LoraModule] = []
    kept: list[_Group] = []
    broken: list[str] = []
    sources: set[str] = set()
    for group in groups.values():
        shape = readers.get(group.kind, _lowrank)(group)
        if isinstance(shape, str):
            broken.append(shape)
            continue
        rank, inp, out, kernel = shape
        component, name = _split(group.kind, group.stem)
        alpha: float | None = None
        if group.alpha:
            sources.add("keys")
        elif group.kind == "peft" and (alpha := _metadata_alpha(config, component, name)) is not None:
            sources.add("metadata")
        else:
            alpha = float(rank)
        modules.append(LoraModule(component, name, rank, alpha, inp, out, kernel))
        kept.append(group)
    # kohya calls every denoiser 'lora_unet_', ComfyUI 'diffusion_model.': if some of those names are DiT
    # blocks, all of them are (embedders named like a UNet's, FLUX.2's shared modulation, Wan's head)
    for prefix, others in (("lora_unet_", {"unet"}), ("diffusion_model.", {"unet", "unknown"})):
        mine = [g.stem.startswith(prefix) for g in kept]
        denoisers = {m.component for m, own in zip(modules, mine, strict=True) if own}
        if "transformer" in denoisers and denoisers & others:
            modules = [
                replace(m, component="transformer") if own and m.component in others else m
                for m, own in zip(modules, mine, strict=True)
            ]
    formats = Counter(g.kind for g in groups.values())
    listed = list(groups.values())
    if "malformed" in formats or not formats:
        fmt = "kohya" if formats else "unknown"
    else:
        fmt = next((k for k in ("cloneofsimo", "lycoris_lokr", "lycoris_loha") if k in formats), "")
        fmt = fmt or ("dora" if any(g.dora for g in listed) else formats.most_common(1)[0][0])
    detected, evidence = detect_family(modules, single_te=any(g.stem.startswith("lora_te_") for g in listed))
    present = {m.component for m in modules}
    control = any(k.endswith("query_norm.scale") for k in unrecognized)  # BFL Flux-control LoRA
    reads = _readable_layouts(family, listed, list(header.tensors))
    problem, non_float = _unsupported(formats, listed, broken, control, reads), non_float_weights(header)
    raw_peft = problem == RAW_PEFT and non_float is None
    lycoris = None
    lycoris_like = {"lycoris_lokr", "lycoris_loha"} & set(formats) or any(g.dora for g in listed)
    other = {"cloneofsimo", "malformed"} & set(formats)
    if (lycoris_like or any(_LOCON_MID in b for b in broken)) and not other:
        lycoris = inspect_lycoris(header)
        present |= {m.component for m in lycoris.modules}  # LoCon Tucker modules are among them
    return LoraInfo(
        format=fmt,
        modules=tuple(modules),
        components=tuple(c for c in COMPONENT_ORDER if c in present),
        ranks=tuple(sorted({m.rank for m in modules})),
        family=detected,
        family_evidence=evidence,
        alpha_source="keys" if "keys" in sources else "metadata" if sources else "default (alpha = rank)",
        unsupported=problem or non_float,
        unrecognized_keys=tuple(unrecognized),
        metadata=header.metadata,
        raw_peft=raw_peft,
        lycoris=lycoris,
    )
