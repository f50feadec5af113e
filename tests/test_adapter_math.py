"""lorarecipe.runner.adapter_math: every ΔW formula against independent oracles.

Oracles: ``lycoris.functional`` (lycoris-lora 4.1.3, the trainer's own rebuild), PEFT 0.21.2's
LoHa/LoKr/LoRA+DoRA layers on a small torch module (``init_weights=False``: every factor random),
and plain-torch float64 references. Bit-for-bit (``torch.equal``) unless a test states its bound.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lorarecipe.inspect.lycoris_keys import dora_axis
from lorarecipe.runner.adapter_math import (
    LYCORIS_DORA_EPS,
    dora_weight,
    loha_delta,
    lokr_delta,
    lokr_scale,
    lora_delta,
)

U = 2.0**-24  # float32 unit roundoff


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def factors(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    return [rand(*shape, seed=seed + i) for i, shape in enumerate(shapes)]


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import sys, lorarecipe.runner.adapter_math; print('torch' in sys.modules)"
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# LoRA / LoCon vs lycoris.functional.locon
# ---------------------------------------------------------------------------------------------

LOCON = {  # name: (down, up, mid)
    "linear": ((4, 24), (20, 4), None),
    "conv1x1": ((4, 12, 1, 1), (16, 4, 1, 1), None),
    "conv3x3": ((4, 12, 3, 3), (16, 4, 1, 1), None),
    "tucker3x3": ((4, 12, 1, 1), (16, 4, 1, 1), (4, 4, 3, 3)),
}


def _locon(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    down, up, mid = LOCON[name]
    a, b = factors(down, up, seed=10)
    return a, b, (rand(*mid, seed=20) if mid else None)


@pytest.mark.parametrize("name", LOCON)
def test_lora_delta_equals_lycoris_bit_for_bit_when_alpha_over_rank_is_a_power_of_two(name: str) -> None:
    locon = pytest.importorskip("lycoris.functional.locon")
    down, up, mid = _locon(name)
    ours = lora_delta(down, up, mid, alpha=8.0, rank=4)
    theirs = locon.diff_weight(down, up, mid, gamma=2.0, backend="torch")
    assert (
        ours.shape
        == theirs.shape
        == (up.shape[0], down.shape[1], *(mid if mid is not None else down).shape[2:])
    )
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", LOCON)
def test_lora_delta_matches_lycoris_within_the_rounding_bound_for_other_scales(name: str) -> None:
    """LyCORIS scales B before the product, lorarecipe (like PEFT) after it. Both are fp32 sums of
    n products of the exact γ·B·A, so each differs from it by at most (n+1)·u·|γ|·Σ|terms|
    (the standard dot-product bound); the two differ by at most twice that."""
    locon = pytest.importorskip("lycoris.functional.locon")
    down, up, mid = _locon(name)
    gamma = 3.0 / 4.0
    ours = lora_delta(down, up, mid, alpha=3.0, rank=4)
    theirs = locon.diff_weight(down, up, mid, gamma=gamma, backend="torch")
    terms = down.shape[0] * (mid.shape[0] if mid is not None else 1)
    bound = 2 * (terms + 2) * U * gamma * _abs_product(down, up, mid).reshape(ours.shape)
    assert bool(((ours.double() - theirs.double()).abs() <= bound).all())


def _abs_product(down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None) -> torch.Tensor:
    """Σ|B||M||A| per element, in float64: the scale of the rounding error of B·A."""
    a, b = down.abs().double().reshape(down.shape[0], -1), up.abs().double().reshape(up.shape[0], -1)
    if mid is None:
        return b @ a
    return torch.einsum("p i, i j ..., j r -> p r ...", b, mid.abs().double(), a)


def test_lora_delta_equals_peft_get_delta_weight() -> None:
    """PEFT multiplies the finished B·A by α/r, as lorarecipe does: bit-for-bit for Linear and 1×1."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        Tiny(), peft.LoraConfig(r=4, lora_alpha=3, target_modules=["lin", "conv1"], init_lora_weights=False)
    )
    for name in ("lin", "conv1"):
        layer = getattr(model.base_model.model, name)
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        ours = lora_delta(a, b, alpha=3.0, rank=4)
        assert torch.equal(ours, layer.get_delta_weight("default").detach()), name


# ---------------------------------------------------------------------------------------------
# LoHa vs lycoris.functional.loha
# ---------------------------------------------------------------------------------------------

LOHA = {  # name: (w1a, w1b, t1 or None, weight shape); w2 has the shapes of w1
    "linear": ((20, 4), (4, 24), None, (20, 24)),
    "conv1x1": ((16, 4), (4, 12), None, (16, 12, 1, 1)),
    "conv3x3": ((16, 4), (4, 108), None, (16, 12, 3, 3)),
    "tucker3x3": ((4, 16), (4, 12), (4, 4, 3, 3), (16, 12, 3, 3)),
}


@pytest.mark.parametrize("name", LOHA)
def test_loha_delta_equals_lycoris_bit_for_bit(name: str) -> None:
    """lycoris.functional.loha.diff_weight takes (w1d, w1u, w2d, w2u, t1, t2): d = hada_w*_b, u = hada_w*_a."""
    loha = pytest.importorskip("lycoris.functional.loha")
    a_shape, b_shape, t_shape, shape = LOHA[name]
    w1a, w1b, w2a, w2b = factors(a_shape, b_shape, a_shape, b_shape, seed=30)
    t1, t2 = (rand(*t_shape, seed=40), rand(*t_shape, seed=41)) if t_shape else (None, None)
    for alpha in (8.0, 3.0):
        ours = loha_delta(w1a, w1b, w2a, w2b, t1, t2, alpha=alpha, rank=4, shape=shape)
        theirs = loha.diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=alpha / 4, backend="torch")
        assert torch.equal(ours, theirs.reshape(shape)), alpha


# ---------------------------------------------------------------------------------------------
# LoKr vs lycoris.functional.lokr
# ---------------------------------------------------------------------------------------------

# name: (w1 | (w1a, w1b), w2 | (w2a, w2b) | (t2, w2a, w2b), weight shape); shapes only
LOKR: dict[str, tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...], tuple[int, ...]]] = {
    "linear-full": (((4, 4),), ((5, 6),), (20, 24)),
    "linear-w2-decomposed": (((4, 4),), ((5, 2), (2, 6)), (20, 24)),
    "linear-both-decomposed": (((4, 2), (2, 4)), ((5, 2), (2, 6)), (20, 24)),
    "conv1x1-full-4d": (((4, 2),), ((4, 6, 1, 1),), (16, 12, 1, 1)),
    "conv3x3-full-4d": (((4, 2),), ((4, 6, 3, 3),), (16, 12, 3, 3)),
    "conv3x3-decomposed-flat": (((4, 2),), ((4, 2), (2, 54)), (16, 12, 3, 3)),
    "conv3x3-decomposed-4d": (((4, 2),), ((4, 2), (2, 6, 3, 3)), (16, 12, 3, 3)),
    "tucker3x3-both": (((4, 2), (2, 2)), ((2, 2, 3, 3), (2, 4), (2, 6)), (16, 12, 3, 3)),
    "old-order-linear": (((20, 4), (4, 20)), ((16, 4), (4, 16)), (320, 320)),
    "old-order-conv3x3": (((20, 4), (4, 60)), ((16, 4), (4, 48)), (320, 320, 3, 3)),
}


def _lokr(name: str, seed: int = 50) -> tuple[object, object, tuple[int, ...], list[torch.Tensor | None]]:
    """Random factors for a LOKR case: (w1 arg, w2 arg, weight shape, lycoris.functional's 7-tuple)."""
    s1, s2, shape = LOKR[name]
    t1, t2 = factors(*s1, seed=seed), factors(*s2, seed=seed + 10)
    w1: object = t1[0] if len(t1) == 1 else (t1[0], t1[1])
    w2: object = t2[0] if len(t2) == 1 else tuple(t2)
    first: list[torch.Tensor | None] = [t1[0], None, None] if len(t1) == 1 else [None, t1[0], t1[1]]
    if len(t2) == 1:
        second: list[torch.Tensor | None] = [t2[0], None, None, None]
    elif len(t2) == 2:
        second = [None, t2[0], t2[1], None]
    else:
        second = [None, t2[1], t2[2], t2[0]]
    return w1, w2, shape, first + second


def _rank(name: str) -> int:
    s1, s2, _ = LOKR[name]
    if len(s1) == 2:
        return s1[0][1]
    if len(s2) == 3:
        return s2[0][0]
    return s2[0][1] if len(s2) == 2 else 1


@pytest.mark.parametrize("name", [n for n in LOKR if not n.startswith("tucker")])
def test_lokr_delta_equals_lycoris_diff_weight_bit_for_bit(name: str) -> None:
    """diff_weight(..., gamma=α) applies LyCORIS's own scale rule: α/r when a factor is decomposed, else 1."""
    lokr = pytest.importorskip("lycoris.functional.lokr")
    w1, w2, shape, flat = _lokr(name)
    ours = lokr_delta(w1, w2, alpha=3.0, rank=_rank(name), shape=shape)  # type: ignore[arg-type]
    theirs = lokr.diff_weight(*flat, gamma=3.0, backend="torch")
    assert torch.equal(ours, theirs.reshape(shape))


def test_lokr_tucker_equals_lycoris_kron_weight_at_scale_alpha_over_t2_rank() -> None:
    lokr = pytest.importorskip("lycoris.functional.lokr")
    w1 = rand(4, 2, seed=1)
    t2, w2a, w2b = rand(3, 3, 3, 3, seed=2), rand(3, 4, seed=3), rand(3, 6, seed=4)
    ours = lokr_delta(w1, (t2, w2a, w2b), alpha=5.0, rank=3, shape=(16, 12, 3, 3))
    theirs = lokr.kron_weight(w1, None, None, None, w2a, w2b, t2, scale=5.0 / 3, backend="torch")
    assert torch.equal(ours, theirs)
    both = lokr_delta(*_lokr("tucker3x3-both")[:2], alpha=5.0, rank=2, shape=(16, 12, 3, 3))  # type: ignore[arg-type]
    assert torch.equal(both, lokr.diff_weight(*_lokr("tucker3x3-both")[3], gamma=5.0, backend="torch"))


def test_lokr_tucker_rank_is_t2s_first_dim_as_lycoris_applies_it() -> None:
    """lycoris.functional.lokr.diff_weight reads a Tucker W2's rank from w2a.shape[1], which is the output
    factor b, not r (its ``rank_scale`` assumes the (b, r) pair layout). LyCORIS's own LokrModule
    forward uses r = lokr_t2.shape[0] (its training-time lora_dim), as ComfyUI does; so does lorarecipe.
    (Its ``get_diff_weight`` scales twice, (α/r)², so the forward pass is the oracle here.)"""
    lokr = pytest.importorskip("lycoris.functional.lokr")
    modules = pytest.importorskip("lycoris.modules.lokr")
    conv = nn.Conv2d(32, 48, 3, padding=1)
    module = modules.LokrModule("t", conv, 1.0, lora_dim=2, alpha=5, use_tucker=True)
    with torch.no_grad():
        for i, parameter in enumerate(module.parameters()):
            parameter.copy_(rand(*parameter.shape, seed=60 + i))
    w1, t2 = module.lokr_w1.detach(), module.lokr_t2.detach()
    w2a, w2b = module.lokr_w2_a.detach(), module.lokr_w2_b.detach()
    assert (tuple(t2.shape), tuple(w2a.shape)) == ((2, 2, 3, 3), (2, 8))
    ours = lokr_delta(w1, (t2, w2a, w2b), alpha=5.0, rank=2, shape=conv.weight.shape)
    h = rand(2, 32, 7, 7, seed=5)
    with torch.no_grad():
        forward = module.bypass_forward_diff(h)
        doubled = module.get_diff_weight()[0].reshape(ours.shape)
    expected = nn.functional.conv2d(h, ours, padding=1)
    assert maxdiff(forward, expected) <= 1e-5 * float(expected.abs().max())  # conv vs kron summation order
    assert torch.equal(doubled, ours * 2.5)
    quirk = lokr.diff_weight(w1, None, None, None, w2a, w2b, t2, gamma=5.0, backend="torch")
    assert torch.equal(quirk, lokr_delta(w1, (t2, w2a, w2b), alpha=5.0, rank=8, shape=conv.weight.shape))


def test_lokr_make_kron_unsqueezes_w1_and_plain_kron_would_not() -> None:
    lokr = pytest.importorskip("lycoris.functional.lokr")
    w1, w2 = rand(4, 2, seed=1), rand(4, 6, 3, 3, seed=2)
    ours = lokr_delta(w1, w2, alpha=1.0, rank=None, shape=(16, 12, 3, 3))
    assert torch.equal(ours, lokr.make_kron(w1, w2, 1.0))
    wrong = torch.kron(w1, w2)  # pads w1 with *leading* dims: (4, 6, 12, 6), kernel mixed into channels
    assert wrong.shape != ours.shape


def test_old_larger_first_files_are_rebuilt_from_stored_shapes() -> None:
    """smart_falcon_4 stores a 320×320 layer as 20×20 ⊗ 16×16; LyCORIS's factorization(320) is (16, 20)."""
    general = pytest.importorskip("lycoris.functional.general")
    w1, w2, shape, _ = _lokr("old-order-linear")
    assert general.factorization(320) == (16, 20)
    ours = lokr_delta(w1, w2, alpha=4.0, rank=4, shape=shape)  # type: ignore[arg-type]
    swapped = lokr_delta(w2, w1, alpha=4.0, rank=4, shape=shape)  # type: ignore[arg-type]
    assert maxdiff(ours, swapped) > 1.0


def test_lokr_scale_conventions() -> None:
    assert lokr_scale(1e10, None, decomposed=False, convention="lycoris") == 1.0  # ai-toolkit placeholder
    assert lokr_scale(8.0, 4, decomposed=True, convention="lycoris") == 2.0
    assert lokr_scale(8.0, 4, decomposed=False, convention="peft") == 2.0
    with pytest.raises(ValueError, match="positive rank"):
        lokr_scale(8.0, None, decomposed=False, convention="peft")
    with pytest.raises(ValueError, match="convention"):
        lokr_scale(8.0, 4, decomposed=True, convention="kohya")  # type: ignore[arg-type]


def test_lokr_delta_refuses_a_shape_its_factors_do_not_make() -> None:
    with pytest.raises(ValueError, match="cannot be reshaped"):
        lokr_delta(rand(4, 4), rand(5, 6), alpha=1.0, rank=None, shape=(24, 20))
    with pytest.raises(TypeError, match="float32"):
        lokr_delta(rand(4, 4).half(), rand(5, 6), alpha=1.0, rank=None, shape=(20, 24))


# ---------------------------------------------------------------------------------------------
# LoHa / LoKr vs PEFT merges
# ---------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 48)
        self.conv1 = nn.Conv2d(32, 48, 1)
        self.conv3 = nn.Conv2d(32, 48, 3, padding=1)


def _peft(config: object) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), config)
    layers = {n: getattr(model.base_model.model, n) for n in TARGETS}
    base = {
        n: layer.get_base_layer().weight.detach().clone()
        for n, layer in layers.items()
        if hasattr(layer, "r")
    }
    return model, base


TARGETS = ("lin", "conv1", "conv3")


def _param(layer: nn.Module, name: str) -> torch.Tensor | None:
    table = getattr(layer, name)
    return table["default"].detach() if "default" in table else None


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_delta_equals_peft_merge(tucker: bool) -> None:
    peft = pytest.importorskip("peft")
    config = peft.LoHaConfig(
        r=4, alpha=6, target_modules=list(TARGETS), init_weights=False, use_effective_conv2d=tucker
    )
    model, base = _peft(config)
    ours = {}
    for name in TARGETS:
        layer = getattr(model.base_model.model, name)
        parts = [_param(layer, f"hada_{p}") for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")]
        ours[name] = loha_delta(*parts, alpha=6.0, rank=4, shape=base[name].shape)  # type: ignore[arg-type]
        assert torch.equal(ours[name], layer.get_delta_weight("default").detach()), name
        assert (parts[4] is not None) == (tucker and name == "conv3")
    merged = model.merge_and_unload()
    for name in TARGETS:
        assert torch.equal(getattr(merged, name).weight.detach(), base[name] + ours[name]), name


def _lokr_parts(layer: nn.Module) -> tuple[object, object, bool]:
    w1 = _param(layer, "lokr_w1")
    first: object = w1 if w1 is not None else (_param(layer, "lokr_w1_a"), _param(layer, "lokr_w1_b"))
    w2, t2 = _param(layer, "lokr_w2"), _param(layer, "lokr_t2")
    pair = (_param(layer, "lokr_w2_a"), _param(layer, "lokr_w2_b"))
    second: object = w2 if w2 is not None else (t2, *pair) if t2 is not None else pair
    return first, second, w1 is None or w2 is None


@pytest.mark.parametrize(
    "r, decompose_both, tucker",
    [(2, True, True), (2, False, False), (8, False, False)],
    ids=["tucker", "w2", "full"],
)
def test_lokr_delta_with_peft_convention_equals_peft_merge(
    r: int, decompose_both: bool, tucker: bool
) -> None:
    peft = pytest.importorskip("peft")
    config = peft.LoKrConfig(
        r=r, alpha=6, target_modules=list(TARGETS), init_weights=False, decompose_both=decompose_both,
        use_effective_conv2d=tucker,
    )  # fmt: skip
    model, base = _peft(config)
    ours = {}
    for name in TARGETS:
        layer = getattr(model.base_model.model, name)
        w1, w2, decomposed = _lokr_parts(layer)
        assert decomposed == (r == 2)
        ours[name] = lokr_delta(w1, w2, alpha=6.0, rank=r, shape=base[name].shape, convention="peft")  # type: ignore[arg-type]
        assert torch.equal(ours[name], layer.get_delta_weight("default").detach()), name
    merged = model.merge_and_unload()
    for name in TARGETS:
        assert torch.equal(getattr(merged, name).weight.detach(), base[name] + ours[name]), name


def test_full_matrix_lokr_differs_between_lycoris_and_peft_conventions() -> None:
    """α = 6, r = 8, both factors full: PEFT scales by α/r = 0.75, the file's LyCORIS meaning by 1."""
    peft = pytest.importorskip("peft")
    model, _ = _peft(peft.LoKrConfig(r=8, alpha=6, target_modules=["lin"], init_weights=False))
    layer = model.base_model.model.lin
    w1, w2, _ = _lokr_parts(layer)
    lycoris = lokr_delta(w1, w2, alpha=6.0, rank=8, shape=(48, 64), convention="lycoris")  # type: ignore[arg-type]
    peft_delta = lokr_delta(w1, w2, alpha=6.0, rank=8, shape=(48, 64), convention="peft")  # type: ignore[arg-type]
    assert torch.equal(peft_delta, layer.get_delta_weight("default").detach())
    assert torch.equal(peft_delta, lycoris * 0.75)
    assert maxdiff(lycoris, peft_delta) > 0.2 * float(lycoris.abs().max())  # a quarter of ΔW


# ---------------------------------------------------------------------------------------------
# DoRA
# ---------------------------------------------------------------------------------------------


def _dora_reference(w: torch.Tensor, dw: torch.Tensor, m: torch.Tensor, axis: str) -> torch.Tensor:
    """W' = m ⊙ V/‖V‖, V = W + ΔW, in float64 with explicit per-channel loops."""
    v = (w + dw).double()
    out = torch.empty_like(v)
    m = m.double().flatten()
    if axis == "row":
        for i in range(v.shape[0]):
            out[i] = m[i] * v[i] / v[i].pow(2).sum().sqrt()
    else:
        for j in range(v.shape[1]):
            out[:, j] = m[j] * v[:, j] / v[:, j].pow(2).sum().sqrt()
    return out


@pytest.mark.parametrize("shape", [(16, 12), (16, 12, 3, 3)], ids=["linear", "conv3x3"])
@pytest.mark.parametrize("axis", ["row", "column"])
def test_dora_weight_equals_a_float64_reference(shape: tuple[int, ...], axis: str) -> None:
    """fp32 norm of n squares: relative error ≤ (n/2 + 2)·u; the scale and product add 2u more."""
    w, dw = rand(*shape, seed=1), 0.1 * rand(*shape, seed=2)
    channels = shape[0] if axis == "row" else shape[1]
    m = rand(channels, seed=3).abs() + 0.5
    ours = dora_weight(w, dw, m, axis)  # type: ignore[arg-type]
    reference = _dora_reference(w, dw, m, axis)
    n = w.numel() // channels
    assert bool(((ours.double() - reference).abs() <= (n / 2 + 5) * U * reference.abs()).all())


@pytest.mark.parametrize("shape", [(16, 12), (16, 12, 3, 3)], ids=["linear", "conv3x3"])
@pytest.mark.parametrize("wd_on_out", [True, False])
def test_dora_weight_equals_lycoris_weight_decompose(shape: tuple[int, ...], wd_on_out: bool) -> None:
    general = pytest.importorskip("lycoris.functional.general")
    w, dw = rand(*shape, seed=1), 0.1 * rand(*shape, seed=2)
    ones = (1,) * (len(shape) - 2)
    scale_shape = (shape[0], 1, *ones) if wd_on_out else (1, shape[1], *ones)
    m = rand(*scale_shape, seed=3).abs() + 0.5
    axis = dora_axis(scale_shape, shape)
    assert axis == ("row" if wd_on_out else "column")
    ours = dora_weight(w, dw, m, axis, eps=LYCORIS_DORA_EPS)
    theirs = general.weight_decompose(w + dw, m, 1, wd_on_out, backend="torch")
    assert torch.equal(ours, theirs)


def _peft_dora() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=list(TARGETS), init_lora_weights=False, use_dora=True
    )
    model, base = _peft(config)
    for name in TARGETS:  # PEFT starts m at ‖W‖; make it something a trained file would hold
        vector = getattr(model.base_model.model, name).lora_magnitude_vector["default"].weight
        vector.data = rand(*vector.shape, seed=7).abs() + 0.5
    return model, base


def test_dora_weight_row_axis_equals_peft_use_dora_merge() -> None:
    model, base = _peft_dora()
    ours = {}
    for name in TARGETS:
        layer = getattr(model.base_model.model, name)
        m = layer.lora_magnitude_vector["default"].weight.detach()
        assert dora_axis(m.shape, base[name].shape, source="peft") == "row"
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        ours[name] = dora_weight(base[name], lora_delta(a, b, alpha=6.0, rank=4), m, "row")
    merged = model.merge_and_unload()
    assert torch.equal(merged.lin.weight.detach(), ours["lin"])
    assert torch.equal(merged.conv1.weight.detach(), ours["conv1"])
    # PEFT builds a k×k conv's B·A with conv2d, not a matmul: equal up to summation order (0.0 here).
    assert maxdiff(merged.conv3.weight.detach(), ours["conv3"]) <= 1e-6 * float(ours["conv3"].abs().max())


def test_dora_strength_interpolates_the_update_and_how_peft_and_lycoris_differ() -> None:
    general = pytest.importorskip("lycoris.functional.general")
    w, dw = rand(16, 12, seed=1), 0.3 * rand(16, 12, seed=2)
    m = rand(16, seed=3).abs() + 0.5
    full = dora_weight(w, dw, m, "row")
    assert torch.equal(dora_weight(w, dw, m, "row", strength=0.0), w)
    assert torch.equal(dora_weight(w, dw, m, "row", strength=0.5), w + 0.5 * (full - w))
    # PEFT's adapter weight s scales ΔW inside the norm: m ⊙ (W + sΔW)/‖W + sΔW‖ ≠ W + s(W' − W).
    peft_half = dora_weight(w, 0.5 * dw, m, "row")
    assert maxdiff(peft_half, dora_weight(w, dw, m, "row", strength=0.5)) > 1e-3
    # LyCORIS merge_to(multiplier=0) keeps the un-normalized W + ΔW.
    assert torch.equal(general.weight_decompose(w + dw, m.reshape(16, 1), 0, True, backend="torch"), w + dw)


def test_peft_dora_scaling_is_delta_scaled_inside_the_norm() -> None:
    model, base = _peft_dora()
    layer = model.base_model.model.lin
    layer.scaling["default"] = 0.5 * 6 / 4  # what set_adapters(weights=[0.5]) does
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    m = layer.lora_magnitude_vector["default"].weight.detach()
    expected = dora_weight(base["lin"], lora_delta(a, b, alpha=0.5 * 6, rank=4), m, "row")
    assert torch.equal(model.merge_and_unload().lin.weight.detach(), expected)


AXES = [  # (scale shape, weight shape, source, axis or None = refused)
    ((16, 1), (16, 12), "lycoris", "row"),
    ((1, 12), (16, 12), "lycoris", "column"),
    ((16,), (16, 12), "lycoris", "row"),
    ((12,), (16, 12), "lycoris", "column"),
    ((16, 1, 1, 1), (16, 12, 3, 3), "lycoris", "row"),
    ((1, 12, 1, 1), (16, 12, 3, 3), "lycoris", "column"),
    ((16, 1), (16, 12, 3, 3), "lycoris", "row"),
    ((1, 16), (16, 16), "lycoris", "column"),  # square, but the layout says which
    ((16, 1), (16, 16), "lycoris", "row"),
    ((16,), (16, 16), "lycoris", None),  # a squeezed scale on a square weight fits both
    ((1, 1), (1, 1), "lycoris", "row"),  # both norms run over the whole tensor
    ((2, 6), (16, 12), "lycoris", None),
    ((16,), (16, 16), "peft", "row"),  # lora_magnitude_vector is per output row by definition
    ((1, 16, 1, 1), (16, 16, 3, 3), "peft", "row"),  # PEFT's conv magnitude layout
    ((12,), (16, 12), "peft", None),
]


@pytest.mark.parametrize("scale_shape, weight_shape, source, axis", AXES)
def test_dora_axis_rule(
    scale_shape: tuple[int, ...], weight_shape: tuple[int, ...], source: str, axis: str | None
) -> None:
    if axis is None:
        with pytest.raises(ValueError):
            dora_axis(scale_shape, weight_shape, source=source)  # type: ignore[arg-type]
    else:
        assert dora_axis(scale_shape, weight_shape, source=source) == axis  # type: ignore[arg-type]


def test_peft_conv_magnitude_would_be_misread_without_the_source() -> None:
    """PEFT stores a conv's per-row magnitude as (1, out, 1, 1), which on a square conv looks like
    LyCORIS's per-column layout: the key name (lora_magnitude_vector vs dora_scale) must decide."""
    assert dora_axis((1, 16, 1, 1), (16, 16, 3, 3)) == "column"
    assert dora_axis((1, 16, 1, 1), (16, 16, 3, 3), source="peft") == "row"
