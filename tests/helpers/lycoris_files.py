"""LyCORIS/DoRA files for tests, with each module's ΔW computed by an independent oracle.

Factors are random, in the shapes the trainers store (kohya/LyCORIS/PEFT), for any algorithm on any
weight shape. The expected ΔW of each module comes from ``lycoris.functional`` (lycoris-lora 4.1.3,
the trainers' own rebuild: ``locon``/``loha``/``lokr.diff_weight``), never from lorarecipe; DoRA is
re-normalized here with plain float64 torch loops. Module names are written by this module's own
rules (kohya: ``lora_unet_`` + dots as underscores; LyCORIS: ``lycoris_``; PEFT/diffusers: the
component and the dotted path), so a test knows which weight every stem must change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

ALGORITHMS = (
    "lora",
    "locon-tucker",
    "loha",
    "loha-tucker",
    "lokr-full",
    "lokr-decomposed",
    "lokr-tucker",
)
KOHYA_PREFIX = {
    "unet": "lora_unet_",
    "transformer": "lora_unet_",
    "text_encoder": "lora_te1_",
    "text_encoder_2": "lora_te2_",
}


def _rand(shape: tuple[int, ...], seed: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _split(n: int) -> tuple[int, int]:
    """n -> (p, q), p·q = n, p the smallest divisor above 1 (or 1): a LoKr factorization."""
    for p in range(2, n):
        if n % p == 0 and p * p <= n:
            return p, n // p
    return 1, n


@dataclass
class Module:
    """One module of a test file: what it adapts and the factors written for it."""

    component: str
    module: str
    shape: tuple[int, ...]
    algorithm: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # key suffix -> tensor
    delta: torch.Tensor | None = None  # the oracle's ΔW, float64, shaped like the weight
    dora: tuple[torch.Tensor, str, float] | None = None  # (magnitude, axis, eps)


def make_module(
    component: str, module: str, shape: tuple[int, ...], algorithm: str, seed: int, rank: int = 2
) -> Module:
    """Random factors for ``algorithm`` on a weight of ``shape``, and lycoris.functional's ΔW of them."""
    from lycoris.functional import locon, loha, lokr

    out, inp, kernel = shape[0], shape[1], tuple(shape[2:])
    conv3 = bool(kernel) and kernel != (1, 1)
    flat_in = inp * math.prod(kernel)
    alpha = 3.0
    t: dict[str, torch.Tensor] = {}
    if algorithm == "lora":
        down_shape = (rank, inp, *kernel) if kernel else (rank, inp)
        up_shape = (out, rank, 1, 1) if kernel else (out, rank)
        t = {"lora_down.weight": _rand(down_shape, seed), "lora_up.weight": _rand(up_shape, seed + 1)}
        delta = locon.diff_weight(t["lora_down.weight"], t["lora_up.weight"], None, gamma=alpha / rank)
    elif algorithm == "locon-tucker":
        assert conv3, "Tucker LoCon is for k×k convolutions"
        t = {
            "lora_down.weight": _rand((rank, inp, 1, 1), seed),
            "lora_mid.weight": _rand((rank, rank, *kernel), seed + 1),
            "lora_up.weight": _rand((out, rank, 1, 1), seed + 2),
        }
        delta = locon.diff_weight(
            t["lora_down.weight"], t["lora_up.weight"], t["lora_mid.weight"], gamma=alpha / rank
        )
    elif algorithm == "loha":
        t = {
            "hada_w1_a": _rand((out, rank), seed),
            "hada_w1_b": _rand((rank, flat_in), seed + 1),
            "hada_w2_a": _rand((out, rank), seed + 2),
            "hada_w2_b": _rand((rank, flat_in), seed + 3),
        }
        delta = loha.diff_weight(
            t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None, gamma=alpha / rank
        )
    elif algorithm == "loha-tucker":
        assert conv3
        t = {
            "hada_w1_a": _rand((rank, out), seed),
            "hada_w1_b": _rand((rank, inp), seed + 1),
            "hada_t1": _rand((rank, rank, *kernel), seed + 2),
            "hada_w2_a": _rand((rank, out), seed + 3),
            "hada_w2_b": _rand((rank, inp), seed + 4),
            "hada_t2": _rand((rank, rank, *kernel), seed + 5),
        }
        delta = loha.diff_weight(
            t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t["hada_t1"], t["hada_t2"],
            gamma=alpha / rank,
        )  # fmt: skip
    else:
        a, b = _split(out)
        c, d = _split(inp)
        t["lokr_w1"] = _rand((a, c), seed)
        if algorithm == "lokr-full":
            t["lokr_w2"] = _rand((b, d, *kernel), seed + 1) if kernel else _rand((b, d), seed + 1)
            alpha = 1e10  # ai-toolkit's placeholder: full factors mean scale 1
            delta = lokr.diff_weight(t["lokr_w1"], None, None, t["lokr_w2"], None, None, None, gamma=alpha)
        elif algorithm == "lokr-decomposed":
            t["lokr_w2_a"] = _rand((b, rank), seed + 1)
            t["lokr_w2_b"] = _rand((rank, d * math.prod(kernel)), seed + 2)
            delta = lokr.diff_weight(
                t["lokr_w1"], None, None, None, t["lokr_w2_a"], t["lokr_w2_b"], None, gamma=alpha
            )
        else:
            assert conv3 and algorithm == "lokr-tucker"
            t["lokr_t2"] = _rand((rank, rank, *kernel), seed + 1)
            t["lokr_w2_a"] = _rand((rank, b), seed + 2)
            t["lokr_w2_b"] = _rand((rank, d), seed + 3)
            # diff_weight reads a Tucker W2's rank from w2a.shape[1] (see test_adapter_math); LyCORIS's
            # module forward uses r = lokr_t2.shape[0], as kron_weight with that scale does
            delta = lokr.kron_weight(
                t["lokr_w1"],
                None,
                None,
                None,
                t["lokr_w2_a"],
                t["lokr_w2_b"],
                t["lokr_t2"],
                scale=alpha / rank,
            )
    t["alpha"] = torch.tensor(alpha)
    return Module(component, module, shape, algorithm, t, delta.double().reshape(shape))


def add_dora(module: Module, axis: str, seed: int, peft: bool = False) -> None:
    """A DoRA magnitude on ``module``: PEFT's per-row ``lora_magnitude_vector`` (peft=True), or a
    LyCORIS ``dora_scale`` (1, in[, 1, 1]) per input column / (out, 1[, 1, 1]) per output row."""
    out, inp, kernel = module.shape[0], module.shape[1], module.shape[2:]
    ones = (1,) * len(kernel)
    channels = out if axis == "row" else inp
    magnitude = _rand((channels,), seed).abs() + 0.5
    if peft:
        assert axis == "row"
        module.tensors["lora_magnitude_vector"] = magnitude
    else:
        shape = (out, 1, *ones) if axis == "row" else (1, inp, *ones)
        module.tensors["dora_scale"] = magnitude.reshape(shape)
    module.dora = (magnitude.double(), axis, 0.0 if peft else 2.0**-23)


def stem(module: Module, layout: str) -> str:
    """The module's name in a file of ``layout``: kohya, lycoris, or diffusers (PEFT)."""
    flat = module.module.replace(".", "_")
    if layout == "kohya":
        if module.component.startswith("text_encoder"):
            return KOHYA_PREFIX[module.component] + "text_model_" + flat
        return KOHYA_PREFIX[module.component] + flat
    if layout == "lycoris":
        return "lycoris_" + flat
    assert layout == "diffusers"
    return f"{module.component}.{module.module}"


def state_dict(modules: list[Module], layout: str) -> dict[str, torch.Tensor]:
    """The file's tensors: every module's factors under its stem (PEFT names for the PEFT layout)."""
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        for suffix, tensor in module.tensors.items():
            if layout == "diffusers":
                suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(
                    suffix, suffix
                )
                if suffix == "alpha":
                    continue  # PEFT files carry alpha in their metadata, not as a tensor
            out[f"{stem(module, layout)}.{suffix}"] = tensor.contiguous()
    return out


def dora_reference(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: str, eps: float
) -> torch.Tensor:
    """W' = m ⊙ V/(‖V‖ + eps), V = W + ΔW, per output row or input column, with explicit loops (float64)."""
    v = weight.double() + delta.double()
    out = torch.empty_like(v)
    if axis == "row":
        for i in range(v.shape[0]):
            out[i] = magnitude[i] * v[i] / (v[i].pow(2).sum().sqrt() + eps)
    else:
        for j in range(v.shape[1]):
            out[:, j] = magnitude[j] * v[:, j] / (v[:, j].pow(2).sum().sqrt() + eps)
    return out


def expected_weight(base: torch.Tensor, modules: list[tuple[Module, float]]) -> torch.Tensor:
    """Base + each (module, strength) in order, float64: s·ΔW, or W + s·(W' − W) for DoRA."""
    weight = base.double()
    for module, strength in modules:
        assert module.delta is not None
        if module.dora is None:
            weight = weight + strength * module.delta
        else:
            magnitude, axis, eps = module.dora
            renormed = dora_reference(weight, module.delta, magnitude, axis, eps)
            weight = weight + strength * (renormed - weight)
    return weight


def adapter_metadata(components: tuple[str, ...], rank: int, alpha: float) -> dict[str, str]:
    """diffusers' ``lora_adapter_metadata`` giving a PEFT-layout file its rank and alpha per component."""
    import json

    doc: dict[str, float] = {}
    for component in components:
        doc.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha})
    return {"lora_adapter_metadata": json.dumps(doc)}


def weights_of(folder: Any, component: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted((folder / component).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out
