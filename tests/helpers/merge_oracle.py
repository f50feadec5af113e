"""PEFT 0.21.2 ``add_weighted_adapter``, recomputed from the LoRA files with plain torch (float64).

An oracle for lorarecipe's ``merges:``: it shares no code with lorarecipe's runner or with PEFT's
``merge_utils``. Factors come from the files through :func:`tests.helpers.lora_math.lora_factors`
(regex key parsing); each combination type is written out below from its algorithm:

- ``cat``: A' = [c₁A₁; c₂A₂; …], B' = [B₁ B₂ …] with cᵢ = wᵢ·αᵢ/rᵢ, so B'A' = Σ cᵢBᵢAᵢ exactly; the
  rank is Σ rᵢ of the adapters present in the component (modules lacking one are zero-padded).
- factor methods (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``, equal
  ranks): the method runs on the A factors and on the B factors separately. The weight is split
  as aᵢ = sign(cᵢ)·√|cᵢ| on A and bᵢ = √|cᵢ| on B, so linear gives B'A' = Σᵢ Σⱼ bᵢaⱼ·BᵢAⱼ (the
  i ≠ j cross terms make it only an approximation of Σ cᵢBᵢAᵢ), and TIES / DARE / magnitude pruning
  act on factors, not on deltas.
- SVD methods (``svd`` = linear, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd``): the method runs on the deltas Dᵢ = αᵢ/rᵢ·BᵢAᵢ with weights wᵢ, then
  D' ≈ U·S·Vh truncated to ``svd_rank`` (default: the largest rank present); B' = U·S, A' = Vh; with
  ``svd_clamp`` = q, both are clamped to ±quantile_q(B' ∪ A').
- the building blocks, on a list of task tensors tᵢ with weights wᵢ: *trim* keeps the
  ⌊density·n⌋ largest |t| (TIES / magnitude_prune); *drop* keeps each entry with probability
  density and divides by density (DARE); sign *election* is sign(Σ tᵢ) ("total") or sign(Σ sign tᵢ)
  ("frequency") of the unweighted (trimmed/dropped) tensors, +1 on a tie; the *disjoint mean* is
  Σ wᵢtᵢ over the entries whose sign equals the elected one, divided by how many there are (≥ 1).
  linear = Σ wᵢtᵢ; magnitude_prune = Σ wᵢ·trim(tᵢ); ties = disjoint mean of trimmed; dare_linear =
  Σ wᵢ·drop(tᵢ); dare_ties = disjoint mean of dropped.
- the merged adapter has lora_alpha = r in every module (scale 1): its delta is B'A'.
- PEFT switches to ``linear`` when it is given one adapter. lorarecipe passes, per component, only
  the adapters present in it, so a component where only one of the merge's adapters is present
  gets the plain weighted copy w·α/r·BA at that adapter's rank (lorarecipe allows that only where it
  is the method's own result: ``linear``, ``cat``, an untruncated unclamped ``svd``); components
  outside ``components`` get no merged adapter.

DARE's mask comes from torch's global RNG, and to compare a built file with this oracle the oracle
must draw the *same* mask. What is reproduced, per component (lorarecipe seeds the RNG with the
merge's ``seed`` before each component's ``add_weighted_adapter``): (1) the draws PEFT makes while
injecting the merged adapter's empty layers, module by module in ``named_modules`` order:
``uniform_`` over A (r' × in) and B (out × r') for the ``nn.Linear``/``nn.Conv2d`` constructors, and
once more over A when the first adapter's ``init_lora_weights`` is True (kohya files through
diffusers; the built-in PEFT files say False); then (2) the masks, module by module: for factor
methods a Bernoulli(density) float32 mask per present adapter over its A, then one per adapter over
its B; for SVD methods one per present adapter over its delta (base-weight shape). Only the RNG's
*position and call shapes* are reproduced; everything the mask is used for (rescaling, sign
election, disjoint mean, weights, SVD) is computed here independently, so a swapped method, a
wrong rescale or a mask applied to the wrong tensor still shows. A wrong replay fails loudly (every
DARE module differs), it cannot make a wrong merge pass. (The replay ties the oracle to PEFT 0.21.2's
layer construction: a PEFT upgrade that draws differently there breaks the DARE cases first.)

The module order comes from instantiating the base's UNet / text encoder classes on the meta device
(what PEFT iterates); no weights are loaded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from safetensors import safe_open

from tests.helpers.lora_math import LoraFactors, lora_factors

__all__ = [
    "COMBINATION_TYPES",
    "COMPONENTS",
    "DENSITY_METHODS",
    "FACTOR_METHODS",
    "RANDOM_METHODS",
    "SIGN_METHODS",
    "SVD_METHODS",
    "MergeParams",
    "OracleMerge",
    "merge_oracle",
    "module_order",
]

Module = tuple[str, str]  # (component, base weight key)

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = {  # *_svd -> the method run on the deltas before the SVD
    "svd": "linear",
    "ties_svd": "ties",
    "dare_linear_svd": "dare_linear",
    "dare_ties_svd": "dare_ties",
    "magnitude_prune_svd": "magnitude_prune",
}
COMBINATION_TYPES = (*FACTOR_METHODS, "cat", *SVD_METHODS)
RANDOM_METHODS = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
SIGN_METHODS = ("ties", "dare_ties", "ties_svd", "dare_ties_svd")
DENSITY_METHODS = (
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
)
# the order diffusers' StableDiffusionPipeline merges its LoRA-loadable components in
COMPONENTS = ("unet", "text_encoder")


@dataclass(frozen=True)
class MergeParams:
    method: str
    density: float | None = None
    majority_sign_method: str = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    seed: int = 0
    components: tuple[str, ...] | None = None  # the merge's ``components:`` (None: every component)
    svd_driver: str | None = None  # torch.linalg.svd's CUDA driver: the same SVD, other numerics


@dataclass
class OracleMerge:
    deltas: dict[Module, torch.Tensor] = field(default_factory=dict)  # float64, base-weight shape
    ranks: dict[Module, int] = field(default_factory=dict)  # rank PEFT allocates per merged module
    methods: dict[str, str] = field(default_factory=dict)  # component -> method actually applied
    # SVD methods: σ₁·(1 + σᵣ/(σᵣ − σᵣ₊₁)) of the matrix truncated to rank r. A float32 SVD is the exact
    # SVD of a matrix perturbed by E, ‖E‖ ~ eps·σ₁; to first order the kept subspace turns by ~‖E‖/gap,
    # which moves the rank-r product by ~σᵣ·‖E‖/gap, on top of ‖E‖ itself. So eps32 times this number
    # scales the error a float32 build may have in that module.
    conditioning: dict[Module, float] = field(default_factory=dict)


# ---- building blocks on lists of task tensors (float64) --------------------------------------------


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·n⌋ entries of largest magnitude, zero the rest."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=torch.bool)
    keep[torch.argsort(t.abs().flatten(), descending=True, stable=True)[:k]] = True
    return torch.where(keep.reshape(t.shape), t, torch.zeros_like(t))


def _drop(t: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (one float32 Bernoulli draw), rescale."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full(tuple(t.shape), density, dtype=torch.float32))
    return t * mask.double() / density


def _elect(ts: Sequence[torch.Tensor], how: str) -> torch.Tensor:
    """+1/-1 per entry: the sign of Σ t ("total") or of Σ sign(t) ("frequency"); ties go to +1."""
    if how == "total":
        votes = torch.stack(list(ts)).sum(0)
    elif how == "frequency":
        votes = torch.stack([t.sign() for t in ts]).sum(0)
    else:
        raise ValueError(how)
    return torch.where(votes >= 0, 1.0, -1.0).double()


def _disjoint_mean(
    ts: Sequence[torch.Tensor], weights: Sequence[float], elected: torch.Tensor
) -> torch.Tensor:
    """Mean of wᵢtᵢ over the tensors whose sign agrees with the elected one (zeros never agree)."""
    total = torch.zeros_like(ts[0])
    count = torch.zeros_like(ts[0])
    for t, w in zip(ts, weights, strict=True):
        agree = (t.sign() == elected).double()
        total += w * t * agree
        count += agree
    return total / count.clamp(min=1.0)


def _combine(
    kind: str, ts: Sequence[torch.Tensor], weights: Sequence[float], params: MergeParams
) -> torch.Tensor:
    """One task-arithmetic method on task tensors ``ts`` with per-tensor ``weights``."""
    density = params.density if params.density is not None else 1.0
    if kind == "linear":
        return sum((w * t for t, w in zip(ts, weights, strict=True)), torch.zeros_like(ts[0]))
    if kind == "magnitude_prune":
        return sum((w * _trim(t, density) for t, w in zip(ts, weights, strict=True)), torch.zeros_like(ts[0]))
    if kind == "dare_linear":
        dropped = [_drop(t, density) for t in ts]  # all draws first, in adapter order (as PEFT)
        return sum((w * t for t, w in zip(dropped, weights, strict=True)), torch.zeros_like(ts[0]))
    if kind == "ties":
        kept = [_trim(t, density) for t in ts]
        return _disjoint_mean(kept, weights, _elect(kept, params.majority_sign_method))
    if kind == "dare_ties":
        kept = [_drop(t, density) for t in ts]
        return _disjoint_mean(kept, weights, _elect(kept, params.majority_sign_method))
    raise ValueError(f"unknown method {kind}")


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile with linear interpolation between order statistics (numpy's default)."""
    ordered = torch.sort(values.flatten()).values
    pos = q * (ordered.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, ordered.numel() - 1)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


# ---- per-module merges ------------------------------------------------------------------------------


def _factor_merge(
    kind: str, present: Sequence[tuple[float, LoraFactors]], params: MergeParams, shape: torch.Size
) -> torch.Tensor:
    a_weights: list[float] = []
    b_weights: list[float] = []
    for weight, f in present:
        c = weight * f.scale
        a_weights.append(math.sqrt(abs(c)) * (1.0 if c >= 0 else -1.0))  # the sign goes to A only
        b_weights.append(math.sqrt(abs(c)))
    down = _combine(kind, [f.down.double() for _, f in present], a_weights, params)  # A side first
    up = _combine(kind, [f.up.double() for _, f in present], b_weights, params)
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


def _svd_merge(
    kind: str,
    present: Sequence[tuple[float, LoraFactors]],
    params: MergeParams,
    shape: torch.Size,
    rank: int,
    gauge: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, float]:
    """(merged delta, conditioning of the truncation: see ``OracleMerge.conditioning``)."""
    combined = _combine(kind, [f.delta(shape) for _, f in present], [w for w, _ in present], params)
    u, s, vh = torch.linalg.svd(combined.reshape(shape[0], -1), full_matrices=False)
    gap = float(s[rank - 1] - (s[rank] if rank < s.numel() else 0.0))
    conditioning = float(s[0]) * (1.0 + float(s[rank - 1]) / gap) if gap > 0 else math.inf
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if params.svd_clamp is not None:
        if gauge is not None:
            # Each singular pair is defined up to a joint sign flip, which leaves up @ down alone but
            # not the clamp threshold (a quantile over the signed entries). Take PEFT's signs from
            # the built factors (only their signs: the values here stay the oracle's own).
            built_up = gauge[0].double().flatten(1)
            if built_up.shape == up.shape:
                flip = torch.where((built_up * up).sum(0) < 0, -1.0, 1.0).double()
                up, down = up * flip, down * flip[:, None]
        hi = _quantile(torch.cat([up.flatten(), down.flatten()]), params.svd_clamp)
        # min(max(x, -hi), hi): like torch.clamp, every entry becomes hi when hi < 0
        up = torch.minimum(torch.maximum(up, -hi), hi)
        down = torch.minimum(torch.maximum(down, -hi), hi)
    return (up @ down).reshape(shape), conditioning


# ---- the model's module order and the RNG replay ---------------------------------------------------


@cache
def module_order(base_dir: Path, component: str) -> tuple[str, ...]:
    """Names of ``component``'s modules in ``named_modules`` order (the class built on the meta device)."""
    import diffusers
    import transformers

    library, class_name = json.loads((base_dir / "model_index.json").read_text())[component]
    folder = base_dir / component
    with torch.device("meta"):
        if library == "diffusers":
            cls = getattr(diffusers, class_name)
            model = cls.from_config(cls.load_config(str(folder)))
        else:
            cls = getattr(transformers, class_name)
            model = cls(cls.config_class.from_pretrained(str(folder)))
    return tuple(name for name, _ in model.named_modules())


def _ordered(base_dir: Path, component: str, keys: set[str]) -> list[str]:
    """Base weight keys sorted by their module's position in the model."""
    position: dict[str, int] = {}
    for i, name in enumerate(module_order(base_dir, component)):
        for candidate in (f"{name}.weight", f"{name.removeprefix('text_model.')}.weight"):
            position.setdefault(candidate, i)
    missing = keys - position.keys()
    assert not missing, f"modules not in the {component} model: {sorted(missing)[:3]}"
    return sorted(keys, key=position.__getitem__)


def _init_twice(path: Path, component: str) -> bool:
    """Whether PEFT re-initialises A (``init_lora_weights`` True) for a merge led by this file."""
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
    if "lora_adapter_metadata" in meta:
        value = json.loads(meta["lora_adapter_metadata"]).get(f"{component}.init_lora_weights", True)
    else:
        value = True  # kohya / old layouts: diffusers builds a LoraConfig with PEFT's default
    if value not in (True, False):
        raise NotImplementedError(f"init_lora_weights={value!r}: its RNG draws are not replayed")
    return bool(value)


def _replay_injection(shapes: Sequence[torch.Size], rank: int, init_twice: bool) -> None:
    """Consume the RNG as PEFT's ``update_layer`` does for the merged adapter's new, empty layers."""
    for shape in shapes:
        tail = (1, 1) if len(shape) == 4 else ()
        a = torch.empty((rank, shape[1], *tail))
        a.uniform_()  # nn.Linear / nn.Conv2d constructor: kaiming_uniform_ on A
        torch.empty((shape[0], rank, *tail)).uniform_()  # ... and on B
        if init_twice:
            a.uniform_()  # reset_lora_parameters: kaiming_uniform_ on A again (B is zeroed)


# ---- the merge --------------------------------------------------------------------------------------


def merge_oracle(
    base_dir: Path,
    base: Mapping[str, Mapping[str, torch.Tensor]],
    loras: Sequence[tuple[Path, float]],
    params: MergeParams,
    gauge: Mapping[Module, tuple[torch.Tensor, torch.Tensor]] | None = None,
    reader: Callable[
        [Path, Mapping[str, Mapping[str, torch.Tensor]]], Mapping[Module, LoraFactors]
    ] = lora_factors,
) -> OracleMerge:
    """The merged adapter lorarecipe builds for ``loras`` (file, weight) with ``params``.

    ``base`` maps component -> base weight key -> tensor (only shapes are used). ``gauge`` (the built
    file's (up, down) per module) is only read to fix the SVD sign convention when ``svd_clamp`` is
    set, see ``_svd_merge``. ``reader``: how a LoRA file's factors are read (FLUX.2/Wan files:
    ``dit_math.dit_reader``).
    """
    files = [(reader(path, base), weight, path) for path, weight in loras]
    out = OracleMerge()
    with torch.random.fork_rng(devices=[]):  # the replayed draws leave the caller's RNG alone
        for component in base:  # SD: COMPONENTS; FLUX.1: transformer, text_encoder
            if params.components is not None and component not in params.components:
                continue
            present = [(f, w, p) for f, w, p in files if any(m[0] == component for m in f)]
            if not present:
                continue
            method = params.method if len(present) > 1 else "linear"
            out.methods[component] = method
            ranks = [max(x.rank for m, x in f.items() if m[0] == component) for f, _, _ in present]
            if method in FACTOR_METHODS:
                assert len(set(ranks)) == 1, f"{method} needs equal ranks, got {ranks}"
                rank = ranks[0]
            elif method == "cat":
                rank = sum(ranks)
            else:
                rank = params.svd_rank or max(ranks)
            keys = _ordered(
                base_dir, component, {m[1] for f, _, _ in present for m in f if m[0] == component}
            )
            shapes = [base[component][k].shape for k in keys]
            if method in RANDOM_METHODS:
                torch.manual_seed(params.seed)
                _replay_injection(shapes, rank, _init_twice(present[0][2], component))
            for key, shape in zip(keys, shapes, strict=True):
                module = (component, key)
                here = [(w, f[module]) for f, w, _ in present if module in f]
                if method == "cat":
                    delta = sum(
                        (w * x.delta(shape) for w, x in here), torch.zeros(shape, dtype=torch.float64)
                    )
                elif method in FACTOR_METHODS:
                    delta = _factor_merge(method, here, params, shape)
                else:
                    g = gauge.get(module) if gauge is not None else None
                    delta, out.conditioning[module] = _svd_merge(
                        SVD_METHODS[method], here, params, shape, rank, g
                    )
                out.deltas[module] = delta
                out.ranks[module] = rank
    return out
