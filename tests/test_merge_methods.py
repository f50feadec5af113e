"""Every PEFT merge method lorarecipe offers, checked against an independent recomputation.

For each combination type (both sign elections, ``svd_rank`` and ``svd_clamp`` where they apply)
a recipe on the built-in tiny models merges the built-in LoRAs and writes the merged adapter as a
LoRA file in both layouts and fused into a pipeline. ``tests/helpers/merge_oracle.py`` recomputes
the merge from the LoRA files with plain torch in float64, and each test checks

- (a) both files' per-module delta α/r·B@A against the oracle (deltas, not factors: an SVD's factors
  are only defined up to sign/rotation), and the merged adapter's convention (α = r, the rank PEFT
  allocates);
- (b) the fused weights against base + lora_scale·(oracle delta), and that nothing else changed;
- (c) that the *other* plausible merges (every other method valid for these ranks, the other sign
  election, another density, svd without rank/clamp, another seed) differ from the built result
  by at least ``SWAP_FACTOR`` times the tolerance: the test fails if a method is swapped.

Adapters: EQUAL (style r4 α8 PEFT, toy r4 α4 UNet only, pixel r4 α1 kohya with 1×1 conv proj)
for the equal-rank methods; UNEQUAL (style r4, detail r8 α4 kohya with 1×1 convs, pixel r4) for
cat / svd / *_svd. Both sets reach the text encoder (style, detail, pixel) and 1×1 convs.

FLUX.1 (tiny-flux): FLUX_EQUAL (style r4 α8 PEFT with CLIP, aitk r4 ai-toolkit BFL names whose fused
qkv/linear1 lorarecipe splits) and FLUX_UNEQUAL (+ detail r8 α4 kohya BFL with CLIP, xlabs r4 XLabs);
the oracle reads the BFL files with ``lora_math``'s own table. Their kohya-layout files fuse q/k/v
again (rank Σr, block-diagonal), so only their deltas are compared, not the α = r convention.

Qwen-Image, Z-Image and SD 3 (tiny-qwen-image, tiny-z-image, tiny-sd3): ``DIT_CASES``, each family's
layouts merged together (PEFT, kohya, ai-toolkit, DiffSynth, bare names with alphas; Z-Image's
original names with fused qkv; SD 3's original MMDiT names with its CLIPs), equal-rank methods on
r4 sets and SVD/cat methods on sets with an r8 kohya file (the loaders fold a kohya file's alpha/rank
into its factors, as diffusers' converters do, so files with alpha ≠ rank join SVD/cat cases only).

FLUX.2 Klein (tiny-flux2-klein) and Wan (tiny-wan): ``FLUX2_WAN_CASES`` on KLEIN_/WAN_EQUAL (style r4
α8 PEFT + the r4 ai-toolkit / ComfyUI file) and KLEIN_/WAN_UNEQUAL (+ detail r8 α4 kohya/musubi with
embedders, modulation and final layer), read by ``dit_math``'s own tables; a representative subset of
the combination types each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.errors import BuildError, RecipeError
from tests.helpers.dit_math import dit_reader
from tests.helpers.lora_math import LoraFactors, lora_factors, read_component_weights
from tests.helpers.merge_oracle import (
    COMBINATION_TYPES,
    COMPONENTS,
    DENSITY_METHODS,
    FACTOR_METHODS,
    RANDOM_METHODS,
    SIGN_METHODS,
    SVD_METHODS,
    MergeParams,
    OracleMerge,
    merge_oracle,
)
from tests.helpers.recipes import build_text, compile_text, problems_of

Module = tuple[str, str]
Base = dict[str, dict[str, torch.Tensor]]  # component -> base weight key -> tensor

EQUAL = (("style", 0.8), ("toy", 0.6), ("pixel", -0.5))  # all r4; a negative weight on purpose
UNEQUAL = (("style", 0.7), ("detail", 0.5), ("pixel", -0.4))  # r4 + r8 + r4
FLUX_EQUAL = (("style", 0.8), ("aitk", -0.6))  # r4 PEFT + r4 ai-toolkit (BFL names)
FLUX_UNEQUAL = (("style", 0.7), ("detail", 0.5), ("xlabs", 0.4))  # r4 + r8 kohya BFL + r4 XLabs
QWEN_EQUAL = (("style", 0.8), ("aitk", -0.6), ("diffsynth", 0.5))  # r4 PEFT, ai-toolkit, DiffSynth
QWEN_UNEQUAL = (("style", 0.7), ("detail", 0.5), ("bare", -0.4))  # + r8 kohya, r4 bare names α2
# (the loaders fold a file's alpha/rank into its factors, which factor methods see: kohya-style files with
# alpha ≠ rank take part in SVD/cat cases only, as for FLUX.1)
Z_EQUAL = (("style", 0.8), ("aitk", -0.6))  # r4 PEFT, r4 ai-toolkit (no alpha)
Z_UNEQUAL = (("style", 0.7), ("detail", 0.5), ("comfy", -0.4))  # + r8 kohya, r4 original names (qkv)
SD3_EQUAL = (("style", 0.8), ("toy", -0.6))  # r4 PEFT with CLIPs, r4 transformer only
SD3_UNEQUAL = (("style", 0.7), ("detail", 0.5), ("toy", -0.4))  # + r8 kohya original MMDiT names, CLIPs
KLEIN_EQUAL = (("style", 0.8), ("aitk", -0.6))  # r4 PEFT + r4 ai-toolkit (BFL names, fused qkv)
KLEIN_UNEQUAL = (("style", 0.7), ("detail", 0.5), ("aitk", 0.4))  # + r8 kohya BFL (modulation, final layer)
WAN_EQUAL = (("style", 0.8), ("comfy", -0.6))  # r4 PEFT + r4 ComfyUI (diffusion_model., alpha 2)
WAN_UNEQUAL = (("style", 0.7), ("detail", 0.5), ("comfy", 0.4))  # + r8 musubi (blocks, embedders, head)
UNEQUAL_SETS = (UNEQUAL, FLUX_UNEQUAL, QWEN_UNEQUAL, Z_UNEQUAL, SD3_UNEQUAL, KLEIN_UNEQUAL, WAN_UNEQUAL)
NAMED_SETS = (
    EQUAL,
    UNEQUAL,
    FLUX_EQUAL,
    FLUX_UNEQUAL,
    QWEN_EQUAL,
    Z_EQUAL,
    SD3_EQUAL,
    KLEIN_EQUAL,
    WAN_EQUAL,
    *UNEQUAL_SETS,
)
LORA_SCALE = 0.8

EPS32 = float(torch.finfo(torch.float32).eps)
# Non-SVD methods: PEFT works on float32 factors (exact copies of the files' values; TIES/magnitude
# selections see the same numbers as the oracle) and sums ≤ 3 weighted terms, then the delta is
# B'@A' over rank ≤ 16; |values| ≤ ~2. The float32 rounding of that is ≲ 16·2·eps32 ≈ 4e-6 in the worst
# case; measured ≤ 3e-7. 1e-5 is the bound.
ABS_TOL = 1e-5
# SVD methods: a float32 SVD is backward stable (the exact SVD of a matrix E away, ‖E‖ ~ c(n)·eps32·σ₁)
# and the rank-r truncation moves by ~‖E‖·(1 + σᵣ/(σᵣ − σᵣ₊₁)) to first order (the kept subspace turns
# by ~‖E‖/gap): tolerance SVD_FACTOR·eps32·σ₁(1 + σᵣ/gap) per module (``OracleMerge.conditioning``).
# Measured error / (eps32·conditioning): ≤ 0.6 without svd_clamp, ≤ 6 with it (the clamp threshold is a
# quantile of float32 values and moves by the same order). 32 leaves room for other LAPACK builds.
SVD_FACTOR = 32.0
# A near-degenerate truncation (σᵣ ≈ σᵣ₊₁) makes that tolerance loose: refuse cases where it exceeds this
# fraction of the module's largest delta value. The loosest module here (σᵣ − σᵣ₊₁ = 1e-4·σ₁ after a
# DARE-TIES drop) gets 4.5%, all others < 1%; the elementwise error measured there is 3.8e-5.
MAX_RELATIVE_TOL = 0.05
# Fused weights: W + lora_scale·ΔW rounded to float32 once more (|W + ΔW| ≤ ~2: ≤ 2.4e-7), plus the
# fuser's own float32 B@A (same bound as ABS_TOL).
FUSED_EXTRA = 1e-5
# A swapped method must be farther from the built result than this many tolerances (the closest
# alternative over all cases is measured 2,291 tolerances away: magnitude_prune_svd for svd).
SWAP_FACTOR = 100.0


@dataclass(frozen=True)
class Case:
    params: MergeParams
    adapters: tuple[tuple[str, float], ...]
    base: str = "tiny-sd"

    @property
    def id(self) -> str:
        p = self.params
        parts = [p.method]
        if p.method in SIGN_METHODS:
            parts.append(p.majority_sign_method)
        if p.svd_rank is not None:
            parts.append(f"rank{p.svd_rank}")
        if p.svd_clamp is not None:
            parts.append(f"clamp{p.svd_clamp}")
        if self.adapters not in NAMED_SETS:
            parts.append("+".join(name for name, _ in self.adapters))
        if p.components is not None:
            parts.append("only-" + "+".join(p.components))
        if self.base != "tiny-sd":
            parts.insert(0, self.base)
        return "-".join(parts)

    def loras(self) -> list[tuple[Path, float]]:
        return [(builtin_lora_path(f"{self.base}/{name}"), weight) for name, weight in self.adapters]


def _case(method: str, adapters: tuple[tuple[str, float], ...] | None = None, **params: Any) -> Case:
    if adapters is None:
        adapters = EQUAL if method in FACTOR_METHODS else UNEQUAL
    return Case(MergeParams(method, **params), adapters)


CASES = [
    _case("linear"),
    _case("cat"),
    _case("svd"),
    _case("svd", svd_rank=6),
    _case("svd", svd_clamp=0.9),
    _case("ties", density=0.5, majority_sign_method="total"),
    _case("ties", density=0.5, majority_sign_method="frequency"),
    _case("ties_svd", density=0.5, majority_sign_method="total"),
    _case("ties_svd", density=0.5, majority_sign_method="frequency"),
    _case("ties_svd", density=0.5, majority_sign_method="frequency", svd_rank=6, svd_clamp=0.95),
    _case("dare_linear", density=0.7, seed=3),
    _case("dare_ties", density=0.7, seed=3, majority_sign_method="total"),
    _case("dare_ties", density=0.7, seed=3, majority_sign_method="frequency"),
    _case("dare_linear_svd", density=0.7, seed=4),
    _case("dare_linear_svd", density=0.7, seed=4, svd_rank=6, svd_clamp=0.95),
    _case("dare_ties_svd", density=0.7, seed=4, majority_sign_method="total"),
    _case("dare_ties_svd", density=0.7, seed=4, majority_sign_method="frequency"),
    _case("dare_ties_svd", density=0.7, seed=4, majority_sign_method="total", svd_rank=6, svd_clamp=0.95),
    _case("magnitude_prune", density=0.4),
    _case("magnitude_prune_svd", density=0.4),
    _case("magnitude_prune_svd", density=0.4, svd_rank=6, svd_clamp=0.95),
    # toy has no text-encoder layers: a method that is not its own lone-adapter result (PEFT merges a
    # lone adapter with linear) is merged only where both are (components: [unet]; refused otherwise,
    # test_a_lone_adapter_component_is_refused) ...
    _case("ties", (("style", 0.8), ("toy", 0.6)), density=0.5, components=("unet",)),
    # ... and where the lone-adapter linear merge is the method's result, the text encoder gets style alone
    _case("linear", (("style", 0.8), ("toy", 0.6))),
    _case("svd", (("style", 0.8), ("toy", 0.6))),
]
LONE = (("style", 0.8), ("toy", 0.6))


def merge_yaml(name: str, case: Case) -> str:
    p = case.params
    lines = [
        f"  {name}:",
        f"    method: {p.method}",
        "    adapters: {" + ", ".join(f"{a}: {w}" for a, w in case.adapters) + "}",
    ]
    if p.density is not None:
        lines.append(f"    density: {p.density}")
    if p.method in SIGN_METHODS:
        lines.append(f"    majority_sign_method: {p.majority_sign_method}")
    if p.svd_rank is not None:
        lines.append(f"    svd_rank: {p.svd_rank}")
    if p.svd_clamp is not None:
        lines.append(f"    svd_clamp: {p.svd_clamp}")
    if p.method in RANDOM_METHODS:
        lines.append(f"    seed: {p.seed}")
    if p.components is not None:
        lines.append(f"    components: [{', '.join(p.components)}]")
    if p.svd_driver is not None:
        lines.append(f"    svd_driver: {p.svd_driver}")
    return "\n".join(lines) + "\n"


def recipe(merges: Mapping[str, Case], outputs: str) -> str:
    names = sorted({a for case in merges.values() for a, _ in case.adapters})
    base = next(iter(merges.values())).base
    return (
        f"base: builtin:{base}\nadapters:\n"
        + "".join(f"  {n}: builtin:{base}/{n}\n" for n in names)
        + "merges:\n"
        + "".join(merge_yaml(name, case) for name, case in merges.items())
        + outputs
    )


def one_merge_recipe(case: Case) -> str:
    return recipe(
        {"merged": case},
        f"fuse: {{adapters: [merged], lora_scale: {LORA_SCALE}}}\n"
        "outputs:\n"
        "  lora: {kind: lora, adapter: merged, path: lora, layout: diffusers}\n"
        "  lora-kohya: {kind: lora, adapter: merged, path: lora-kohya, layout: kohya}\n"
        "  fused: {kind: pipeline, path: fused, card: false}\n",
    )


@pytest.fixture(scope="module")
def base_dir() -> Path:
    return builtin_base_path("tiny-sd")


@pytest.fixture(scope="module")
def base(base_dir: Path) -> Base:
    return {c: read_component_weights(base_dir, c) for c in COMPONENTS}


def tolerances(oracle: OracleMerge) -> dict[Module, float]:
    """Per-module tolerance of a float32 build against the float64 oracle (see the constants)."""
    tol = {}
    for module, delta in oracle.deltas.items():
        tol[module] = max(ABS_TOL, SVD_FACTOR * EPS32 * oracle.conditioning.get(module, 0.0))
        assert tol[module] <= MAX_RELATIVE_TOL * delta.abs().max().item(), f"ill-conditioned: {module}"
    return tol


def worst(got: Mapping[Module, torch.Tensor], want: Mapping[Module, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    return max((got[k] - want[k]).abs().max().item() for k in got)


def alternatives(case: Case) -> list[MergeParams]:
    """The merges a mix-up could have produced instead: every other combination type PEFT accepts
    for these ranks (each sign election), the other sign election, another density, the SVD
    without svd_rank / svd_clamp, another seed."""
    p = case.params
    equal_ranks = case.adapters not in UNEQUAL_SETS
    density = p.density or 0.5
    out: list[MergeParams] = []
    for method in COMBINATION_TYPES:
        if method in FACTOR_METHODS and not equal_ranks:
            continue  # PEFT refuses unequal ranks for these
        svd = method in SVD_METHODS
        for sign in ("total", "frequency") if method in SIGN_METHODS else ("total",):
            out.append(
                MergeParams(
                    method,
                    density=density if method in DENSITY_METHODS else None,
                    majority_sign_method=sign,
                    svd_rank=p.svd_rank if svd else None,
                    svd_clamp=p.svd_clamp if svd else None,
                    seed=p.seed,
                    components=p.components,
                )
            )
    if p.density is not None:
        out.append(replace(p, density=min(1.0, p.density + 0.2)))
    if p.svd_rank is not None:
        out.append(replace(p, svd_rank=None))
    if p.svd_clamp is not None:
        out.append(replace(p, svd_clamp=None))
    if p.method in RANDOM_METHODS:
        out.append(replace(p, seed=p.seed + 1))
    return [alt for alt in out if alt != p]


def distance(
    got: Mapping[Module, torch.Tensor], other: Mapping[Module, torch.Tensor], tol: Mapping[Module, float]
) -> float:
    """How many tolerances apart two merges are at their farthest module (inf if the modules differ)."""
    if got.keys() != other.keys():
        return float("inf")
    return max((got[k] - other[k]).abs().max().item() / tol[k] for k in got)


def deltas_of(factors: Mapping[Module, LoraFactors], base: Base) -> dict[Module, torch.Tensor]:
    return {k: f.delta(base[k[0]][k[1]].shape) for k, f in factors.items()}


def lora_files(out: Path) -> dict[str, Path]:
    return {
        "diffusers": out / "lora" / "pytorch_lora_weights.safetensors",
        "kohya": out / "lora-kohya" / "merged.safetensors",
    }


def check_lora_file(
    file: Path,
    oracle: OracleMerge,
    tol: Mapping[Module, float],
    base: Base,
    convention: bool = True,
    reader: Callable[[Path, Base], Mapping[Module, LoraFactors]] = lora_factors,
) -> dict[Module, float]:
    """(a): the file's per-module delta is the oracle's, and (``convention``) its α = r convention;
    returns the errors."""
    factors = reader(file, base)
    assert factors.keys() == oracle.deltas.keys(), file.name
    errors = {}
    for module, f in factors.items():
        # PEFT's merged adapter: lora_alpha = r everywhere (scale 1), at the rank the method allocates
        assert not convention or f.down.shape[0] == f.rank == f.alpha == oracle.ranks[module], (
            file.name,
            module,
        )
        errors[module] = (f.delta(oracle.deltas[module].shape) - oracle.deltas[module]).abs().max().item()
        assert errors[module] <= tol[module], (file.name, module, errors[module], tol[module])
    return errors


def check_fused(folder: Path, oracle: OracleMerge, tol: Mapping[Module, float], base: Base) -> float:
    """(b): fused = base + lora_scale·ΔW where the merge has a module, untouched elsewhere; the error."""
    fused = {c: read_component_weights(folder, c) for c in base}
    changed = {(c, k) for c in base for k, v in fused[c].items() if not torch.equal(v, base[c][k])}
    assert changed == oracle.deltas.keys()
    error = 0.0
    for (c, k), delta in oracle.deltas.items():
        here = (fused[c][k].double() - (base[c][k].double() + LORA_SCALE * delta)).abs().max().item()
        assert here <= LORA_SCALE * tol[(c, k)] + FUSED_EXTRA, ((c, k), here)
        error = max(error, here)
    return error


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merge_matches_the_oracle(
    case: Case, base_dir: Path, base: Base, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    build_text(tmp_path, one_merge_recipe(case))
    files = lora_files(tmp_path / "out")
    built = lora_factors(files["diffusers"], base)
    gauge = {k: (f.up, f.down) for k, f in built.items()}
    oracle = merge_oracle(base_dir, base, case.loras(), case.params, gauge)
    tol = tolerances(oracle)
    # the case reaches the text encoder (unless the merge leaves it out), and 1×1 convolutions when
    # pixel or detail takes part
    assert any(c == "text_encoder" for c, _ in oracle.deltas) == (case.params.components is None)
    if {"pixel", "detail"} & {name for name, _ in case.adapters}:
        assert any(d.dim() == 4 for d in oracle.deltas.values())

    errors = {layout: check_lora_file(file, oracle, tol, base) for layout, file in files.items()}
    fused_error = check_fused(tmp_path / "out" / "fused", oracle, tol, base)

    # (c) a swapped method would not pass
    got = deltas_of(built, base)
    distances = {
        alt: distance(got, merge_oracle(base_dir, base, case.loras(), alt, gauge).deltas, tol)
        for alt in alternatives(case)
    }
    closest = min(distances, key=distances.__getitem__)
    assert distances[closest] >= SWAP_FACTOR, f"{closest} is as close to the build as the oracle"

    if case.adapters == LONE and case.params.components is None:
        # PEFT merges a lone adapter linearly: the text encoder holds 0.8·ΔW_style, the method's result
        assert oracle.methods == {"unet": case.params.method, "text_encoder": "linear"}
        style = lora_factors(builtin_lora_path("tiny-sd/style"), base)
        for k in [k for k in got if k[0] == "text_encoder"]:
            assert (got[k] - 0.8 * style[k].delta(got[k].shape)).abs().max().item() <= ABS_TOL
    if case.params.components is not None:
        assert {c for c, _ in got} == set(case.params.components) == set(oracle.methods)

    # the measured margins, for calibrating the tolerances (kept by pytest --junitxml=… -o junit_family=legacy)
    record_property("lora_error", max(max(e.values()) for e in errors.values()))
    record_property("fused_error", fused_error)
    record_property("max_tolerance", max(tol.values()))
    svd = [
        e[m] / (EPS32 * oracle.conditioning[m])
        for e in errors.values()
        for m in e
        if m in oracle.conditioning
    ]
    record_property("svd_error_over_eps_conditioning", max([0.0, *svd]))
    record_property("closest_swap", f"{closest} at {distances[closest]:.0f} tolerances")


FLUX_CASES = [  # every combination type, across the FLUX.1 layouts; aitk has no CLIP layers, so the
    # equal-rank methods that a lone adapter would not run are limited to the transformer
    Case(MergeParams("linear"), FLUX_EQUAL, "tiny-flux"),
    Case(MergeParams("ties", density=0.5, components=("transformer",)), FLUX_EQUAL, "tiny-flux"),
    Case(
        MergeParams("dare_linear", density=0.7, seed=3, components=("transformer",)), FLUX_EQUAL, "tiny-flux"
    ),
    Case(
        MergeParams(
            "dare_ties", density=0.7, seed=3, majority_sign_method="frequency", components=("transformer",)
        ),
        FLUX_EQUAL,
        "tiny-flux",
    ),
    Case(MergeParams("magnitude_prune", density=0.4, components=("transformer",)), FLUX_EQUAL, "tiny-flux"),
    Case(MergeParams("cat"), FLUX_UNEQUAL, "tiny-flux"),
    Case(MergeParams("svd", svd_rank=6), FLUX_UNEQUAL, "tiny-flux"),
    Case(MergeParams("ties_svd", density=0.5, majority_sign_method="frequency"), FLUX_UNEQUAL, "tiny-flux"),
    Case(MergeParams("dare_linear_svd", density=0.7, seed=4), FLUX_UNEQUAL, "tiny-flux"),
    Case(
        MergeParams(
            "dare_ties_svd", density=0.7, seed=4, majority_sign_method="total", svd_rank=6, svd_clamp=0.95
        ),
        FLUX_UNEQUAL,
        "tiny-flux",
    ),
    Case(MergeParams("magnitude_prune_svd", density=0.4), FLUX_UNEQUAL, "tiny-flux"),
]


@pytest.fixture(scope="module")
def flux_base_dir() -> Path:
    return builtin_base_path("tiny-flux")


@pytest.fixture(scope="module")
def flux_base(flux_base_dir: Path) -> Base:
    return {c: read_component_weights(flux_base_dir, c) for c in ("transformer", "text_encoder")}


@pytest.mark.parametrize("case", FLUX_CASES, ids=lambda c: c.id)
def test_flux_merge_matches_the_oracle(
    case: Case, flux_base_dir: Path, flux_base: Base, tmp_path: Path
) -> None:
    """FLUX.1 merges across layouts (PEFT, ai-toolkit, kohya, XLabs): (a) the diffusers file per module
    and the kohya file's deltas, (b) the fused transformer and CLIP, (c) no swapped method passes."""
    build_text(tmp_path, one_merge_recipe(case))
    files = lora_files(tmp_path / "out")
    built = lora_factors(files["diffusers"], flux_base)
    gauge = {k: (f.up, f.down) for k, f in built.items()}
    oracle = merge_oracle(flux_base_dir, flux_base, case.loras(), case.params, gauge)
    tol = tolerances(oracle)
    assert {c for c, _ in oracle.deltas} == set(case.params.components or ("transformer", "text_encoder"))
    assert (
        "transformer",
        "single_transformer_blocks.1.proj_mlp.weight",
    ) in oracle.deltas  # split from linear1
    check_lora_file(files["diffusers"], oracle, tol, flux_base)
    check_lora_file(files["kohya"], oracle, tol, flux_base, convention=False)
    check_fused(tmp_path / "out" / "fused", oracle, tol, flux_base)
    got = deltas_of(built, flux_base)
    distances = {
        alt: distance(got, merge_oracle(flux_base_dir, flux_base, case.loras(), alt, gauge).deltas, tol)
        for alt in alternatives(case)
    }
    closest = min(distances, key=distances.__getitem__)
    assert distances[closest] >= SWAP_FACTOR, f"{closest} is as close to the build as the oracle"


DIT_CASES = [  # every family's layouts merged; SD 3's toy has no CLIP layers (components as for FLUX.1)
    Case(MergeParams("ties", density=0.5, majority_sign_method="frequency"), QWEN_EQUAL, "tiny-qwen-image"),
    Case(MergeParams("cat"), QWEN_UNEQUAL, "tiny-qwen-image"),
    Case(MergeParams("dare_ties_svd", density=0.7, seed=4, svd_rank=6), QWEN_UNEQUAL, "tiny-qwen-image"),
    Case(MergeParams("dare_linear", density=0.7, seed=3), Z_EQUAL, "tiny-z-image"),
    Case(MergeParams("magnitude_prune", density=0.4), Z_EQUAL, "tiny-z-image"),
    Case(MergeParams("svd", svd_rank=6), Z_UNEQUAL, "tiny-z-image"),
    Case(MergeParams("linear"), SD3_EQUAL, "tiny-sd3"),
    Case(MergeParams("dare_ties", density=0.7, seed=3, components=("transformer",)), SD3_EQUAL, "tiny-sd3"),
    Case(MergeParams("ties_svd", density=0.5, svd_clamp=0.95), SD3_UNEQUAL, "tiny-sd3"),
]
DIT_COMPONENTS = {
    "tiny-qwen-image": ("transformer",),
    "tiny-z-image": ("transformer",),
    "tiny-sd3": ("transformer", "text_encoder", "text_encoder_2"),
}


@pytest.mark.parametrize("case", DIT_CASES, ids=lambda c: c.id)
def test_dit_family_merge_matches_the_oracle(case: Case, tmp_path: Path) -> None:
    """Qwen-Image, Z-Image and SD 3 merges across their layouts: (a) the diffusers file per module and
    the kohya/ComfyUI file's deltas, (b) the fused weights, (c) no swapped method passes."""
    base_dir = builtin_base_path(case.base)
    base = {c: read_component_weights(base_dir, c) for c in DIT_COMPONENTS[case.base]}
    build_text(tmp_path, one_merge_recipe(case))
    files = lora_files(tmp_path / "out")
    built = lora_factors(files["diffusers"], base)
    gauge = {k: (f.up, f.down) for k, f in built.items()}
    oracle = merge_oracle(base_dir, base, case.loras(), case.params, gauge)
    tol = tolerances(oracle)
    assert {c for c, _ in oracle.deltas} == set(case.params.components or DIT_COMPONENTS[case.base])
    check_lora_file(files["diffusers"], oracle, tol, base)
    check_lora_file(files["kohya"], oracle, tol, base, convention=case.base == "tiny-qwen-image")
    check_fused(tmp_path / "out" / "fused", oracle, tol, base)
    got = deltas_of(built, base)
    distances = {
        alt: distance(got, merge_oracle(base_dir, base, case.loras(), alt, gauge).deltas, tol)
        for alt in alternatives(case)
    }
    closest = min(distances, key=distances.__getitem__)
    assert distances[closest] >= SWAP_FACTOR, f"{closest} is as close to the build as the oracle"


FLUX2_WAN_CASES = [
    Case(MergeParams("linear"), KLEIN_EQUAL, "tiny-flux2-klein"),
    Case(MergeParams("ties", density=0.5, majority_sign_method="frequency"), KLEIN_EQUAL, "tiny-flux2-klein"),
    Case(MergeParams("dare_linear", density=0.7, seed=3), KLEIN_EQUAL, "tiny-flux2-klein"),
    Case(MergeParams("cat"), KLEIN_UNEQUAL, "tiny-flux2-klein"),
    Case(MergeParams("svd", svd_rank=6), KLEIN_UNEQUAL, "tiny-flux2-klein"),
    Case(MergeParams("dare_ties_svd", density=0.7, seed=4), KLEIN_UNEQUAL, "tiny-flux2-klein"),
    Case(MergeParams("linear"), WAN_EQUAL, "tiny-wan"),
    Case(MergeParams("dare_ties", density=0.7, seed=3), WAN_EQUAL, "tiny-wan"),
    Case(MergeParams("magnitude_prune", density=0.4), WAN_EQUAL, "tiny-wan"),
    Case(MergeParams("cat"), WAN_UNEQUAL, "tiny-wan"),
    Case(MergeParams("ties_svd", density=0.5, svd_rank=6, svd_clamp=0.95), WAN_UNEQUAL, "tiny-wan"),
]


@pytest.mark.parametrize("case", FLUX2_WAN_CASES, ids=lambda c: c.id)
def test_flux2_and_wan_merges_match_the_oracle(case: Case, tmp_path: Path) -> None:
    """FLUX.2 Klein and Wan merges across layouts: (a) the diffusers file per module (α = r) and the
    kohya/musubi file's deltas, (b) the fused transformer, (c) no swapped method passes."""
    base_dir = builtin_base_path(case.base)
    base = {"transformer": read_component_weights(base_dir, "transformer")}
    reader = dit_reader("wan" if case.base == "tiny-wan" else "flux2")
    build_text(tmp_path, one_merge_recipe(case))
    files = lora_files(tmp_path / "out")
    built = lora_factors(files["diffusers"], base)
    gauge = {k: (f.up, f.down) for k, f in built.items()}
    oracle = merge_oracle(base_dir, base, case.loras(), case.params, gauge, reader)
    tol = tolerances(oracle)
    if "detail" in dict(case.adapters):  # modules outside the blocks: embedders, shared modulation, head
        assert ("transformer", "proj_out.weight") in oracle.deltas
    check_lora_file(files["diffusers"], oracle, tol, base)
    check_lora_file(files["kohya"], oracle, tol, base, convention=False, reader=reader)
    check_fused(tmp_path / "out" / "fused", oracle, tol, base)
    got = deltas_of(built, base)
    distances = {
        alt: distance(got, merge_oracle(base_dir, base, case.loras(), alt, gauge, reader).deltas, tol)
        for alt in alternatives(case)
    }
    closest = min(distances, key=distances.__getitem__)
    assert distances[closest] >= SWAP_FACTOR, f"{closest} is as close to the build as the oracle"


ON_BOTH_EXECUTORS = ("dare_ties-frequency", "dare_ties_svd-total-rank6-clamp0.95")


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ON_BOTH_EXECUTORS], ids=lambda c: c.id)
def test_the_diffusers_executor_fuses_the_same_merge(
    case: Case, base_dir: Path, base: Base, tmp_path: Path
) -> None:
    """The fused output above came from the streaming fuser (its own weightless skeleton and RNG
    draws); the diffusers pipeline executor must fuse the same merge."""
    build_text(tmp_path, one_merge_recipe(case), executor="diffusers")
    built = lora_factors(lora_files(tmp_path / "out")["diffusers"], base)
    gauge = {k: (f.up, f.down) for k, f in built.items()}
    oracle = merge_oracle(base_dir, base, case.loras(), case.params, gauge)
    check_fused(tmp_path / "out" / "fused", oracle, tolerances(oracle), base)


def test_svd_rank_at_the_total_rank_is_the_exact_sum(base_dir: Path, base: Base, tmp_path: Path) -> None:
    """svd with svd_rank ≥ Σ rᵢ (4 + 8 + 4) keeps every singular value: the file holds Σ wᵢΔWᵢ."""
    case = _case("svd", svd_rank=16)
    build_text(tmp_path, one_merge_recipe(case))
    got = deltas_of(lora_factors(tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors", base), base)
    exact = merge_oracle(base_dir, base, case.loras(), MergeParams("cat")).deltas
    # SVD of an exactly rank-16 matrix in float32: the 16 kept singular values carry it all, and what is
    # left is the float32 backward error, ~√n·eps32·σ₁ ≤ 7e-6 (n ≤ 128, σ₁ ≤ 5.2); measured 7e-7
    assert worst(got, exact) <= 5e-5


DARE_PAIR = {
    "dl": _case("dare_linear", density=0.6, seed=11),
    "dts": _case("dare_ties_svd", density=0.6, seed=12, majority_sign_method="frequency", svd_clamp=0.95),
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dare_builds_are_byte_identical(tmp_path: Path) -> None:
    text = recipe(
        DARE_PAIR,
        "outputs:\n"
        + "".join(
            f"  {m}-{layout}: {{kind: lora, adapter: {m}, path: {m}-{layout}, layout: {layout}}}\n"
            for m in DARE_PAIR
            for layout in ("diffusers", "kohya")
        ),
    )
    build_text(tmp_path, text, out="first")
    build_text(tmp_path, text, out="second")
    files = sorted(p.relative_to(tmp_path / "first") for p in (tmp_path / "first").rglob("*.safetensors"))
    assert len(files) == 4
    for file in files:
        assert _sha256(tmp_path / "first" / file) == _sha256(tmp_path / "second" / file), file


def test_dare_seed_belongs_to_its_merge(base_dir: Path, base: Base, tmp_path: Path) -> None:
    """Two merges differing only in seed differ; a DARE merge added before another leaves it unchanged."""
    late = _case("dare_linear", density=0.6, seed=5)
    alone = {"late": late, "other": replace(late, params=replace(late.params, seed=6))}
    # early comes first in the recipe (and in the plan) and draws from the RNG before the others
    crowded = {"early": _case("dare_ties", density=0.3, seed=99, majority_sign_method="total"), **alone}
    for folder, merges in (("alone", alone), ("crowded", crowded)):
        outputs = "".join(f"  {m}: {{kind: lora, adapter: {m}, path: {m}}}\n" for m in merges)
        (tmp_path / folder).mkdir()
        build_text(tmp_path / folder, recipe(merges, "outputs:\n" + outputs))

    def read(folder: str, merge: str) -> dict[Module, torch.Tensor]:
        path = tmp_path / folder / "out" / merge / "pytorch_lora_weights.safetensors"
        return deltas_of(lora_factors(path, base), base)

    assert worst(read("alone", "late"), read("crowded", "late")) == 0.0
    assert worst(read("alone", "other"), read("crowded", "other")) == 0.0
    assert worst(read("alone", "late"), read("alone", "other")) > 1e-2
    for merge, case in alone.items():
        oracle = merge_oracle(base_dir, base, case.loras(), case.params)
        assert worst(read("crowded", merge), oracle.deltas) <= ABS_TOL


@pytest.mark.parametrize("method", COMBINATION_TYPES)
def test_a_lone_adapter_component_is_refused(method: str, tmp_path: Path) -> None:
    """toy has no text-encoder layers, so PEFT would merge style alone there with ``linear``: refused
    at compile time (from headers) for every method whose own result that is not, with the shared
    components as the fix; ``linear``, ``cat`` and an untruncated ``svd`` compile, and so does the
    same merge restricted to ``components: [unet]``."""
    params = MergeParams(method, density=0.5 if method in DENSITY_METHODS else None)
    text = recipe(
        {"merged": Case(params, LONE)}, "outputs:\n  lora: {kind: lora, adapter: merged, path: lora}\n"
    )
    if method in ("linear", "cat", "svd"):
        compile_text(tmp_path, text)
    else:
        (problem,) = problems_of(tmp_path, text)
        assert problem.path == "merges.merged.method"
        assert problem.message == (
            f"method {method!r} would not run in text_encoder: only 'style' has text_encoder layers ('toy' "
            "has none), and PEFT merges a lone adapter with 'linear', ignoring the method and its parameters"
        )
        assert problem.hint == "merge only where all adapters are: components: [unet]"
    compile_text(
        tmp_path,
        recipe({"merged": Case(replace(params, components=("unet",)), LONE)}, text[text.index("outputs:") :]),
    )


@pytest.mark.parametrize(
    ("extra", "refused"), [({"svd_rank": 3}, True), ({"svd_clamp": 0.9}, True), ({"svd_rank": 4}, False)]
)
def test_a_lone_adapter_svd_is_refused_where_it_would_truncate_or_clamp(
    extra: dict[str, Any], refused: bool, tmp_path: Path
) -> None:
    """style is r4: an SVD kept to ≥ 4 values is style's own delta, fewer (or a clamp) is not."""
    text = recipe(
        {"merged": Case(MergeParams("svd", **extra), LONE)},
        "outputs:\n  lora: {kind: lora, adapter: merged, path: lora}\n",
    )
    if refused:
        assert "would not run in text_encoder" in problems_of(tmp_path, text)[0].message
    else:
        compile_text(tmp_path, text)


def test_a_one_adapter_merge_of_another_method_is_refused(tmp_path: Path) -> None:
    text = recipe(
        {"merged": Case(MergeParams("ties", density=0.5), (("style", 0.8),))},
        "outputs:\n  lora: {kind: lora, adapter: merged, path: lora}\n",
    )
    problems = problems_of(tmp_path, text)
    assert {p.hint for p in problems} == {"a merge of one adapter is its weighted copy: use method 'linear'"}
    assert {p.message.split(":")[0] for p in problems} == {
        "method 'ties' would not run in unet",
        "method 'ties' would not run in text_encoder",
    }


@pytest.mark.parametrize("clamp", [0.5, 0.3, 0.01])
def test_svd_clamp_at_or_below_the_median_is_refused(clamp: float, tmp_path: Path) -> None:
    """PEFT clamps both SVD factors to ±quantile(entries, svd_clamp); at or below the median that
    quantile is ≤ 0 and ``clamp(min=-q, max=q)`` makes every entry q (shown on the oracle below)."""
    text = recipe(
        {"merged": _case("svd", svd_clamp=clamp)},
        "outputs:\n  lora: {kind: lora, adapter: merged, path: lora}\n",
    )
    with pytest.raises(RecipeError) as err:
        compile_text(tmp_path, text)
    (problem,) = err.value.problems
    assert problem.path == "merges.merged.svd_clamp"
    assert f"svd_clamp {clamp} cannot work" in problem.message and "above 0.5" in problem.message


def test_svd_clamp_below_the_median_makes_every_entry_one_constant(base_dir: Path, base: Base) -> None:
    """Why 0.5 is the bound: the oracle's clamp (torch.clamp's semantics, as PEFT calls it) at 0.4
    leaves a delta of rank 1 whose factors are one constant each, at 0.6 a delta of full rank."""
    case = _case("svd", svd_clamp=0.4)
    wrecked = merge_oracle(base_dir, base, case.loras(), case.params).deltas
    kept = merge_oracle(base_dir, base, case.loras(), replace(case.params, svd_clamp=0.6)).deltas
    for module, delta in wrecked.items():
        matrix = delta.flatten(1)
        assert torch.allclose(matrix, matrix.flatten()[0].expand_as(matrix)), module  # one value everywhere
        assert torch.linalg.matrix_rank(kept[module].flatten(1)).item() > 1, module


def test_svd_driver_is_passed_to_peft_on_cuda_and_refused_elsewhere(
    base_dir: Path, base: Base, tmp_path: Path
) -> None:
    """``svd_driver`` is a cuSOLVER option of torch.linalg.svd (CPU/MPS raise for every driver): on a
    CUDA build the merge matches the oracle (the same SVD); elsewhere the build fails naming why."""
    case = _case("svd", svd_rank=6, svd_driver="gesvdj")
    if not torch.cuda.is_available():
        with pytest.raises(
            BuildError,
            match=r"svd_driver 'gesvdj' only works on CUDA \(cuSOLVER\), but this merge runs on cpu",
        ):
            build_text(tmp_path, one_merge_recipe(case))
        assert not (tmp_path / "out" / "fused").exists()
        return
    build_text(tmp_path, one_merge_recipe(case))
    built = lora_factors(lora_files(tmp_path / "out")["diffusers"], base)
    oracle = merge_oracle(
        base_dir, base, case.loras(), case.params, {k: (f.up, f.down) for k, f in built.items()}
    )
    tol = tolerances(oracle)
    for file in lora_files(tmp_path / "out").values():
        check_lora_file(file, oracle, tol, base)
    check_fused(tmp_path / "out" / "fused", oracle, tol, base)


def test_svd_driver_is_part_of_the_merge(tmp_path: Path) -> None:
    """The driver is in the plan (fingerprint, factor-cache key) and only allowed on svd methods."""
    plain = compile_text(tmp_path, one_merge_recipe(_case("svd")))
    driven = compile_text(tmp_path, one_merge_recipe(_case("svd", svd_driver="gesvd")))
    assert driven.step("merge:merged").svd_driver == "gesvd"  # type: ignore[attr-defined]
    assert plain.fingerprint() != driven.fingerprint()
    bad = recipe(
        {"merged": _case("cat", svd_driver="gesvd")},
        "outputs:\n  lora: {kind: lora, adapter: merged, path: lora}\n",
    )
    with pytest.raises(RecipeError, match="only apply to svd methods"):
        compile_text(tmp_path, bad)
