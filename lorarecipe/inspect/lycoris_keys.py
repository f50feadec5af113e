"""A LoRA/LyCORIS file's header -> its adapted modules: algorithm, factor shapes, ranks, ΔW shape.

Header only (names and shapes, never values), pure Python, torch-free. Keys are grouped per module
by their suffix; each module is classified as one ΔW algorithm of :mod:`lorarecipe.runner.adapter_math`
(lora, locon-tucker, loha, loha-tucker, lokr-full, lokr-decomposed, lokr-tucker), plus an optional
DoRA magnitude (dora-peft, dora-lycoris). Every key ends up in exactly one module or in
``unclassified`` with a reason: nothing is dropped silently. Module names are split into component
and module path only; mapping them onto a model is a later step.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..fs.json_files import JsonFileError, parse_json
from .safetensors_header import SafetensorsHeader

__all__ = [
    "ALGORITHMS",
    "DoraAxis",
    "LycorisInfo",
    "LycorisModule",
    "UnclassifiedKey",
    "dora_axis",
    "fits",
    "inspect_lycoris",
    "module_tensors",
    "peft_pattern_matches",
]

DoraAxis = Literal["row", "column"]
ALGORITHMS = ("lora", "locon-tucker", "loha", "loha-tucker", "lokr-full", "lokr-decomposed", "lokr-tucker")
Shape = tuple[int, ...]

# suffix -> (family, role); the first suffix that matches wins, so longer suffixes come first.
_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_down.weight", "lora", "down"),
    (".lora_up.weight", "lora", "up"),
    (".lora_mid.weight", "lora", "mid"),
    (".lora_A.weight", "lora", "down"),
    (".lora_B.weight", "lora", "up"),
    (".lora_B.bias", "lora", "bias"),
    (".lora.down.weight", "lora", "down"),  # old diffusers
    (".lora.up.weight", "lora", "up"),
    (".down.weight", "lora", "down"),  # XLabs '…processor.proj_lora1.down.weight'
    (".up.weight", "lora", "up"),
    (".lora_magnitude_vector.weight", "extra", "magnitude"),
    (".lora_magnitude_vector", "extra", "magnitude"),
    *((f".hada_{p}", "loha", p) for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
    *((f".lokr_{p}", "lokr", p) for p in ("w1_a", "w1_b", "w2_a", "w2_b", "w1", "w2", "t2")),
    (".alpha", "extra", "alpha"),
    (".dora_scale", "extra", "dora_scale"),
)
_KNOWN_UNSUPPORTED = (
    (".lokr_t1", "Tucker-decomposed LoKr W1 ('lokr_t1'): no trainer writes it today, no reference formula"),
    (".diff", "LyCORIS full-weight difference ('full'/'diff'), not a factorized adapter"),
    (".diff_b", "LyCORIS full bias difference ('diff_b'), not a factorized adapter"),
    (".oft_blocks", "LyCORIS OFT/BOFT block: an orthogonal rotation, not an additive ΔW"),
    (".oft_diag", "LyCORIS diag-OFT block: an orthogonal rotation, not an additive ΔW"),
    (".w_norm", "LyCORIS norm-layer weight: a replacement, not an additive ΔW"),
    (".b_norm", "LyCORIS norm-layer bias: a replacement, not an additive ΔW"),
)
_NO_RULE = "no adapter rule applies (not a LoRA/LoHa/LoKr factor, alpha or DoRA magnitude)"
_KOHYA = (
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("lora_unet_", "unet"),
    ("lora_transformer_", "transformer"),
)
_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_UNET_HEADS = (
    "down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding", "add_embedding",
)  # fmt: skip
_LDM_UNET_HEADS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out_")
_DIT_HEADS = (
    "transformer_blocks", "single_transformer_blocks", "double_blocks", "single_blocks", "joint_blocks",
    "blocks", "layers", "x_embedder", "context_embedder", "proj_out", "norm_out", "time_text_embed", "img_in",
    "txt_in", "time_in", "vector_in", "guidance_in", "final_layer",
)  # fmt: skip
_PEFT_SUFFIXES = (
    ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".lora_magnitude_vector.weight",
)  # fmt: skip
_FLOAT = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class LycorisModule:
    """One adapted module. ``rank`` is the r of α/r (None for a full-matrix LoKr, which stores
    none); ``effective_rank`` an upper bound on rank(ΔW) from the shapes; ``delta_shape`` the shape
    the rebuild produces (a flat (out, in·kh·kw) for some conv layouts: see :func:`fits`)."""

    stem: str
    layout: str  # kohya | lycoris | peft | diffusers | ldm | bare
    component: str
    module: str  # kohya/lycoris names keep their underscores
    algorithm: str
    factors: tuple[tuple[str, Shape], ...]
    rank: int | None
    effective_rank: int
    delta_shape: Shape
    convention: str  # lycoris | peft: how α/r applies (differs only for lokr-full)
    alpha_source: str  # key ('.alpha' tensor, value not read here) | metadata | none (LyCORIS: α = r)
    alpha: float | None  # from metadata / adapter config only
    dora: str | None  # dora-lycoris | dora-peft
    dora_shape: Shape | None
    dora_axis: str | None  # None with a note when the shapes cannot decide it
    keys: tuple[str, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class UnclassifiedKey:
    key: str
    reason: str


@dataclass(frozen=True)
class LycorisInfo:
    modules: tuple[LycorisModule, ...]
    unclassified: tuple[UnclassifiedKey, ...]
    algorithms: tuple[tuple[str, int], ...]  # (algorithm, module count), most common first
    convention: str  # lycoris | peft | mixed | none


def module_tensors(module: LycorisModule) -> dict[str, str]:
    """A module's keys by role: ``down``/``up``/``mid``, ``w1_a``…, ``t2``, ``alpha``, ``dora_scale``,
    ``magnitude`` (what the rebuild in :mod:`lorarecipe.runner.adapter_math` reads)."""
    return {_split_key(key)[2]: key for key in module.keys}


def fits(module: LycorisModule, weight_shape: Shape) -> bool:
    """Can the module's ΔW be added to a base weight of this shape? (rows and element count)"""
    return (
        bool(weight_shape)
        and module.delta_shape[0] == weight_shape[0]
        and (math.prod(module.delta_shape) == math.prod(weight_shape))
    )


def dora_axis(
    scale_shape: Sequence[int], weight_shape: Sequence[int], *, source: Literal["lycoris", "peft"] = "lycoris"
) -> DoraAxis:
    """(magnitude shape, weight shape) -> the axis DoRA's norm runs along, or ValueError.

    ``row``: one norm per output channel (PEFT ``lora_magnitude_vector`` (out,); LyCORIS
    ``dora_scale`` (out, 1[, 1, 1]) with ``wd_on_out``). ``column``: one norm per input channel
    (LyCORIS/OneTrainer ``dora_scale`` (1, in[, 1, 1]), the pre-4.x LyCORIS default). A 1-D
    ``dora_scale`` (a squeezed LyCORIS scale) counts as row if its length is ``out`` and column if
    it is ``in``. When a shape fits both — a 1-D scale on a square weight — the axis is refused:
    picking one silently is how diffusers came to drop DoRA (LyCORIS#216). The only exception
    is out == in == 1, where both norms run over the whole tensor and agree. ``source="peft"`` is
    for ``lora_magnitude_vector``, which PEFT defines per output row whatever the weight's shape.
    """
    scale, weight = tuple(int(d) for d in scale_shape), tuple(int(d) for d in weight_shape)
    if len(weight) < 2:
        raise ValueError(f"DoRA needs a weight with at least 2 dims, got {weight}")
    out, inp, ones = weight[0], weight[1], (1,) * (len(weight) - 2)
    if source == "peft":
        if math.prod(scale) != out:
            raise ValueError(
                f"lora_magnitude_vector {scale} does not hold one value per output row of {weight}"
            )
        return "row"
    row = scale in {(out,), (out, 1), (out, 1, *ones)}
    column = scale in {(inp,), (1, inp), (1, inp, *ones)}
    if row and column and out == inp == 1:
        return "row"
    if row and column:
        raise ValueError(
            f"dora_scale {scale} fits both the output-row and the input-column norm of the {weight} weight; "
            "refusing to guess (store it as (out, 1) or (1, in))"
        )
    if row or column:
        return "row" if row else "column"
    raise ValueError(f"dora_scale {scale} fits neither (out, 1) nor (1, in) of the {weight} weight")


def _place(stem: str) -> tuple[str, str, str]:
    """Module name as stored -> (layout, component, module path without the component prefix)."""
    for prefix, component in _KOHYA:
        if stem.startswith(prefix):
            rest = stem[len(prefix) :]
            if component == "unet" and _guess(rest) == "transformer":  # kohya calls every denoiser unet
                component = "transformer"
            return "kohya", component, rest
    if stem.startswith("lycoris_"):
        rest = stem[len("lycoris_") :]
        return "lycoris", _guess(rest), rest
    for prefix, layout in (("base_model.model.", "peft"), ("diffusion_model.", "ldm"), ("", "diffusers")):
        if stem.startswith(prefix) and len(stem) > len(prefix):
            rest = stem[len(prefix) :]
            head, _, tail = rest.partition(".")
            if head in _COMPONENTS and tail:
                return layout, head, tail
            if layout != "diffusers":
                return layout, _guess(rest), rest
    return "bare", _guess(stem), stem


def _guess(path: str) -> str:
    """Component from a module path's first name (dotted or kohya-flat)."""
    if path.startswith(_UNET_HEADS + _LDM_UNET_HEADS):
        return "unet"
    if path.startswith(("text_model", "encoder")):
        return "text_encoder"
    return "transformer" if path.startswith(_DIT_HEADS) else "unknown"


def _split_key(key: str) -> tuple[str, str, str]:
    """Key -> (stem, family, role); family "unsupported" carries the reason as its role."""
    for suffix, family, role in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], family, role
    for suffix, reason in _KNOWN_UNSUPPORTED:
        if key.endswith(suffix):
            return key[: -len(suffix)], "unsupported", reason
    return key, "unsupported", _NO_RULE


def _lora(p: Mapping[str, Shape]) -> tuple[str, int | None, int, Shape, list[str]] | str:
    down, up, mid = p.get("down"), p.get("up"), p.get("mid")
    if down is None or up is None:
        return "LoRA module without its down/A and up/B pair"
    if len(down) not in (2, 4) or len(up) not in (2, 4) or 0 in down + up:
        return f"LoRA down {down} / up {up} are not 2-D or 4-D"
    r, out = down[0], up[0]
    if up[2:] not in ((), (1, 1)) or up[1] != r:
        return f"LoRA up {up} does not match down {down} (rank {r})"
    if mid is None:
        return "lora", r, min(r, out, math.prod(down[1:])), (out, *down[1:]), []
    if len(mid) != 4 or mid[:2] != (r, r) or down[2:] != (1, 1):
        return f"LoCon Tucker lora_mid {mid} does not match down {down} and up {up}"
    return "locon-tucker", r, min(r, out, down[1] * math.prod(mid[2:])), (out, down[1], *mid[2:]), []


def _loha(p: Mapping[str, Shape]) -> tuple[str, int | None, int, Shape, list[str]] | str:
    w1a, w1b, w2a, w2b, t1, t2 = (p.get(n) for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"))
    if w1a is None or w1b is None or w2a is None or w2b is None:
        return "LoHa module lacks one of hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b"
    if (t1 is None) != (t2 is None):
        return "LoHa Tucker module has only one of hada_t1 / hada_t2"
    r1, r2 = w1b[0], w2b[0]
    if t1 is not None and t2 is not None:  # Tucker: w_a (r, out), w_b (r, in), t (r, r, kh, kw)
        ok = all(len(s) == 2 for s in (w1a, w1b, w2a, w2b)) and len(t1) == len(t2) == 4
        ok = ok and t1[:2] == (w1a[0], r1) and t2[:2] == (w2a[0], r2) and t1[2:] == t2[2:]
        ok = ok and w1a[1] == w2a[1] and w1b[1] == w2b[1]
        delta = (w1a[1], w1b[1], *t1[2:])
        algorithm = "loha-tucker"
    else:  # plain: w_a (out, r), w_b (r, in·kh·kw)
        ok = len(w1a) == len(w2a) == 2 and w1a[1] == r1 and w2a[1] == r2 and w1a[0] == w2a[0]
        ok = ok and w1b[1:] == w2b[1:]
        delta = (w1a[0], *w1b[1:])
        algorithm = "loha"
    if not ok:
        return f"LoHa factors do not fit together: {dict(p)}"
    notes = [f"halves have ranks {r1} and {r2}; α/r uses r = {r1} (hada_w1_b)"] if r1 != r2 else []
    return algorithm, r1, min(r1 * r2, delta[0], math.prod(delta[1:])), delta, notes


def _lokr(p: Mapping[str, Shape]) -> tuple[str, int | None, int, Shape, list[str]] | str:
    w1, w1a, w1b = p.get("w1"), p.get("w1_a"), p.get("w1_b")
    w2, w2a, w2b, t2 = p.get("w2"), p.get("w2_a"), p.get("w2_b"), p.get("t2")
    ranks: list[int] = []
    if w1 is not None and w1a is None and w1b is None and len(w1) == 2:
        f1, rank1 = w1, min(w1)
    elif (
        w1 is None and w1a is not None and w1b is not None and len(w1a) == len(w1b) == 2 and w1a[1] == w1b[0]
    ):
        f1, rank1 = (w1a[0], w1b[1]), min(w1a[0], w1a[1], w1b[1])
        ranks.append(w1a[1])
    else:
        return f"LoKr W1 is neither lokr_w1 (2-D) nor a matching lokr_w1_a/lokr_w1_b pair: {dict(p)}"
    if w2 is not None and w2a is None and w2b is None and t2 is None and len(w2) >= 2:
        f2 = w2
        rank2 = min(w2[0], math.prod(w2[1:]))
    elif t2 is not None and w2 is None and w2a is not None and w2b is not None:
        if len(t2) < 3 or len(w2a) != 2 or len(w2b) != 2 or t2[:2] != (w2a[0], w2b[0]):
            return f"LoKr Tucker lokr_t2 {t2} does not match lokr_w2_a {w2a} / lokr_w2_b {w2b}"
        f2 = (w2a[1], w2b[1], *t2[2:])
        rank2 = min(t2[0], f2[0], math.prod(f2[1:]))
        ranks.append(t2[0])
    elif w2 is None and w2a is not None and w2b is not None and len(w2a) == 2 and w2a[1] == w2b[0]:
        f2 = (w2a[0], *w2b[1:])
        rank2 = min(w2a[1], f2[0], math.prod(f2[1:]))
        ranks.append(w2a[1])
    else:
        return f"LoKr W2 is neither lokr_w2, a lokr_w2_a/lokr_w2_b pair nor a Tucker triple: {dict(p)}"
    delta = (f1[0] * f2[0], f1[1] * f2[1], *f2[2:])
    algorithm = "lokr-tucker" if t2 is not None else "lokr-decomposed" if ranks else "lokr-full"
    notes = []
    if len(set(ranks)) > 1:
        notes.append(f"W1 and W2 store ranks {ranks}; α/r uses the W1 rank {ranks[0]} (as LyCORIS does)")
    if f1[0] >= f2[0] and f1[1] >= f2[1] and f1 != f2[:2]:
        notes.append(f"larger factor first (W1 {f1}, W2 {f2}): old LyCORIS order, rebuilt as stored")
    return algorithm, ranks[0] if ranks else None, rank1 * rank2, delta, notes


_READERS = {"lora": _lora, "loha": _loha, "lokr": _lokr}


def _adapter_config(header: SafetensorsHeader, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """PEFT settings: an adapter_config.json mapping, else diffusers' ``lora_adapter_metadata``."""
    if config is not None:
        return dict(config)
    try:  # invalid metadata is ignored here; loading the file refuses it (diffusers parses it too)
        parsed = parse_json(header.metadata.get("lora_adapter_metadata", "{}"), "lora_adapter_metadata")
    except JsonFileError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def peft_pattern_matches(key: str, module: str) -> bool:
    """Whether a PEFT ``rank_pattern``/``alpha_pattern`` key names ``module``, read literally (never as
    a regex: the metadata is untrusted): ``x.y`` names ``x.y`` and any module ending in ``.x.y`` (PEFT's
    ``(.*\\.)?key$``), ``^x.y`` only ``x.y`` itself (diffusers anchors the keys it writes that way)."""
    if key.startswith("^"):
        return module == key[1:]
    return module == key or module.endswith("." + key)


def _config_value(config: Mapping[str, Any], component: str, module: str, fields: tuple[str, ...]) -> Any:
    """A PEFT field for one module: its pattern dict (module-name suffixes matched literally, never
    as regexes: the metadata is untrusted), then '<component>.<field>' (diffusers), then '<field>'."""
    pattern_name = "rank_pattern" if fields[0] == "r" else "alpha_pattern"
    for name in (f"{component}.{pattern_name}", pattern_name):
        pattern = config.get(name)
        if isinstance(pattern, dict):
            for key, value in pattern.items():
                if isinstance(key, str) and peft_pattern_matches(key, module):
                    return value
    for field in fields:
        for name in (f"{component}.{field}", field):
            if name in config:
                return config[name]
    return None


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _module(
    stem: str, family: str, parts: dict[str, tuple[str, Shape]], keys: list[str], config: Mapping[str, Any]
) -> LycorisModule | str:
    """One stem's keys -> a classified module, or the reason its keys are unclassified."""
    shapes = {role: shape for role, (_, shape) in parts.items()}
    found = _READERS[family](
        {r: s for r, s in shapes.items() if r not in ("alpha", "dora_scale", "magnitude")}
    )
    if isinstance(found, str):
        return found
    algorithm, rank, effective, delta, notes = found
    layout, component, name = _place(stem)
    alpha: float | None = None
    if "alpha" in shapes:
        convention, alpha_source = "lycoris", "key"
        if shapes["alpha"] not in ((), (1,)):
            notes.append(f"alpha tensor has shape {shapes['alpha']}, expected a scalar")
    elif layout in ("peft", "diffusers") or any(k.endswith(_PEFT_SUFFIXES) for k in keys):
        convention = "peft"
        alpha = _number(_config_value(config, component, name, ("alpha", "lora_alpha")))
        alpha_source = "metadata" if alpha is not None else "none"
        config_rank = _number(_config_value(config, component, name, ("r",)))
        if rank is None and config_rank is not None:
            rank = int(config_rank)
    else:
        convention, alpha_source = "lycoris", "none"
    dora = dora_shape = axis = None
    if "dora_scale" in shapes or "magnitude" in shapes:
        if "dora_scale" in shapes and "magnitude" in shapes:
            return "module has both a LyCORIS dora_scale and a PEFT lora_magnitude_vector"
        peft = "magnitude" in shapes
        dora, dora_shape = (
            ("dora-peft", shapes["magnitude"]) if peft else ("dora-lycoris", shapes["dora_scale"])
        )
        try:
            axis = dora_axis(dora_shape, delta, source="peft" if peft else "lycoris")
        except ValueError as exc:
            notes.append(f"DoRA axis undecided from ΔW {delta}: {exc}")
    if "bias" in shapes:
        notes.append(f"also adds a bias delta (lora_B.bias {shapes['bias']})")
    odd = sorted({dtype for role, (dtype, _) in parts.items() if dtype not in _FLOAT})
    if odd:
        notes.append(f"non-float factor dtypes {odd}: values would be read as garbage")
    return LycorisModule(
        stem=stem,
        layout=layout,
        component=component,
        module=name,
        algorithm=algorithm,
        factors=tuple(
            sorted((r, s) for r, s in shapes.items() if r not in ("alpha", "dora_scale", "magnitude"))
        ),
        rank=rank,
        effective_rank=effective,
        delta_shape=delta,
        convention=convention,
        alpha_source=alpha_source,
        alpha=alpha,
        dora=dora,
        dora_shape=dora_shape,
        dora_axis=axis,
        keys=tuple(sorted(keys)),
        notes=tuple(notes),
    )


def inspect_lycoris(
    header: SafetensorsHeader, *, adapter_config: Mapping[str, Any] | None = None
) -> LycorisInfo:
    """Header (+ a PEFT adapter_config.json, if the file came with one) -> :class:`LycorisInfo`.

    Never raises on odd files: a key no rule applies to, or a module whose factors do not fit
    together, lands in ``unclassified`` with the reason.
    """
    config = _adapter_config(header, adapter_config)
    groups: dict[str, dict[str, tuple[str, Shape]]] = {}
    keys: dict[str, list[str]] = {}
    families: dict[str, set[str]] = {}
    unclassified: list[UnclassifiedKey] = []
    blocked: dict[str, str] = {}  # stem -> why its module cannot be classified: all its keys go with it
    for key, info in header.tensors.items():
        stem, family, role = _split_key(key)
        if family == "unsupported":
            unclassified.append(UnclassifiedKey(key, role))
            blocked.setdefault(stem, f"module also has a key no rule applies to: {role}")
            continue
        if role in groups.setdefault(stem, {}):  # e.g. both '.lora_A.weight' and '.lora_down.weight'
            blocked.setdefault(stem, f"two keys hold the module's '{role}' factor")
        groups[stem][role] = (info.dtype, info.shape)
        keys.setdefault(stem, []).append(key)
        if family != "extra":
            families.setdefault(stem, set()).add(family)
    modules: list[LycorisModule] = []
    for stem, parts in groups.items():
        kinds = families.get(stem, set())
        found: LycorisModule | str
        if stem in blocked:
            found = blocked[stem]
        elif len(kinds) == 1:
            found = _module(stem, next(iter(kinds)), parts, keys[stem], config)
        elif kinds:
            found = f"module mixes {sorted(kinds)} factors"
        else:
            found = f"{'/'.join(sorted(parts))} without any adapter factors for this module"
        if isinstance(found, str):
            unclassified.extend(UnclassifiedKey(key, found) for key in keys[stem])
        else:
            modules.append(found)
    # kohya names every denoiser 'lora_unet_'; if some of its modules are DiT blocks, all of them are.
    if any(m.stem.startswith("lora_unet_") and m.component == "transformer" for m in modules):
        denoiser = [m.stem.startswith("lora_unet_") for m in modules]
        modules = [
            replace(m, component="transformer") if d else m for m, d in zip(modules, denoiser, strict=True)
        ]
    conventions = {m.convention for m in modules}
    convention = next(iter(conventions)) if len(conventions) == 1 else "mixed" if conventions else "none"
    return LycorisInfo(
        modules=tuple(modules),
        unclassified=tuple(sorted(unclassified, key=lambda u: u.key)),
        algorithms=tuple(Counter(m.algorithm for m in modules).most_common()),
        convention=convention,
    )
