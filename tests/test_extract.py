"""``extract``: any adapters (LoRA, LyCORIS, DoRA, PEFT merges) -> a plain LoRA by truncated SVD.

Oracles: the combined delta computed by the tests from the inputs (``lycoris.functional`` for LyCORIS
factors, float64 loops for DoRA, ``tests.helpers.lora_math`` for LoRA files), float64 singular values
for Eckart–Young (the error of the best rank-r approximation is the tail energy), and the written
files read back by ``lora_math`` (kohya layout, FLUX.1's fused BFL names) and by diffusers' own loader.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.runner.extract import extract_lora
from tests.helpers.lora_math import lora_deltas
from tests.helpers.lycoris_files import add_dora, dora_reference, make_module, state_dict, weights_of
from tests.helpers.recipes import build_text

pytest.importorskip("lycoris.functional")


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tail_error(delta: torch.Tensor, rank: int) -> float:
    """Eckart–Young: ‖ΔW − best rank-r‖_F / ‖ΔW‖_F = sqrt(Σ_{i>r} σᵢ²) / sqrt(Σ σᵢ²), in float64."""
    s = torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))
    return math.sqrt(float((s[rank:] ** 2).sum()) / float((s**2).sum()))


# ---------------------------------------------------------------------------------------------
# The SVD step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 64), (16, 12, 3, 3)], ids=["linear", "conv3x3"])
def test_full_rank_reproduces_the_delta_to_float32_precision(shape: tuple[int, ...]) -> None:
    delta = rand(*shape, seed=1)
    found = extract_lora(delta, rank=10_000)
    assert found is not None and found.rank == min(shape[0], math.prod(shape[1:]))
    product = (found.up.reshape(shape[0], -1) @ found.down.reshape(found.rank, -1)).reshape(shape)
    assert found.down.shape[1:] == shape[1:] and found.up.shape[:2] == (shape[0], found.rank)
    assert float((product - delta).norm() / delta.norm()) < 1e-6 and found.relative_error < 1e-6


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_low_rank_error_is_the_tail_energy(rank: int) -> None:
    delta = rand(40, 24, seed=2) @ torch.diag(torch.linspace(3, 0.1, 24)) @ rand(24, 24, seed=3)
    found = extract_lora(delta, rank)
    assert found is not None and found.rank == rank
    measured = float((found.up @ found.down - delta).double().norm() / delta.double().norm())
    assert abs(found.relative_error - tail_error(delta, rank)) < 1e-5
    assert abs(measured - tail_error(delta, rank)) < 1e-5


def test_energy_threshold_keeps_the_fewest_singular_values() -> None:
    q1, _ = torch.linalg.qr(rand(30, 30, seed=4))
    q2, _ = torch.linalg.qr(rand(20, 20, seed=5))
    singular = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5] + [0.01] * 15)
    delta = q1[:, :20] @ torch.diag(singular) @ q2.T
    energy = torch.cumsum(singular.double() ** 2, 0) / float((singular.double() ** 2).sum())
    for threshold in (0.5, 0.9, 0.99, 0.999):
        expected = int((energy < threshold).sum()) + 1
        found = extract_lora(delta, rank=16, energy=threshold)
        assert found is not None and found.rank == expected, threshold
    capped = extract_lora(delta, rank=2, energy=0.999)
    assert capped is not None and capped.rank == 2


def test_clamp_bounds_the_factors_and_the_error_is_measured_after_it() -> None:
    delta = rand(32, 32, seed=6)
    plain, clamped = extract_lora(delta, 8), extract_lora(delta, 8, clamp=0.9)
    assert plain is not None and clamped is not None
    limit = torch.quantile(torch.cat([plain.up.flatten(), plain.down.flatten()]), 0.9)
    assert float(clamped.up.abs().max()) <= float(limit) + 1e-7
    assert float(clamped.down.abs().max()) <= float(limit) + 1e-7
    assert clamped.relative_error > plain.relative_error
    measured = float((clamped.up @ clamped.down - delta).norm() / delta.norm())
    assert abs(measured - clamped.relative_error) < 1e-6
    assert extract_lora(torch.zeros(4, 4), 2) is None


# ---------------------------------------------------------------------------------------------
# Builds: LyCORIS + DoRA + LoRA + a PEFT merge extracted, written in both layouts
# ---------------------------------------------------------------------------------------------

_A = "down_blocks.0.attentions.0.transformer_blocks.0."
LYCO = [  # (component, module, shape, algorithm, DoRA axis)
    ("unet", _A + "attn1.to_q", (32, 32), "lokr-decomposed", None),
    ("unet", _A + "ff.net.0.proj", (256, 32), "loha", None),
    ("unet", "down_blocks.0.resnets.0.conv1", (32, 32, 3, 3), "locon-tucker", None),
    ("unet", _A + "attn2.to_out.0", (32, 32), "lora", "column"),
    ("text_encoder", "encoder.layers.0.self_attn.v_proj", (32, 32), "lokr-full", "row"),
]
W_LYCO, W_STYLE, W_MERGE = 0.7, 0.5, -0.4


@pytest.fixture(scope="module")
def sd_extraction(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[tuple[str, str], torch.Tensor]]:
    """One build: lyco (LyCORIS + DoRA) × 0.7 + style (PEFT LoRA) × 0.5 + a cat merge of style and
    detail × −0.4, extracted at full rank (``full``) and at rank 2 with an energy threshold (``low``);
    returns the output folder and the oracle's combined delta of every module, float64."""
    folder = tmp_path_factory.mktemp("extract")
    modules = []
    for i, (component, name, shape, algorithm, dora) in enumerate(LYCO):
        module = make_module(component, name, shape, algorithm, seed=500 + 10 * i)
        if dora:
            add_dora(module, dora, seed=505 + 10 * i)
        modules.append(module)
    save_file(state_dict(modules, "kohya"), str(folder / "lyco.safetensors"))
    text = f"""\
        base: builtin:tiny-sd
        adapters: {{lyco: {{file: lyco.safetensors}}, style: builtin:tiny-sd/style, detail: builtin:tiny-sd/detail}}
        merges:
          both: {{method: cat, adapters: {{style: 1.0, detail: 0.5}}}}
          full: {{method: extract, adapters: {{lyco: {W_LYCO}, style: {W_STYLE}, both: {W_MERGE}}}, svd_rank: 64}}
          low: {{method: extract, adapters: {{lyco: 1.0}}, svd_rank: 2, svd_energy: 0.9}}
        fuse: {{adapters: [full]}}
        outputs:
          full-diffusers: {{kind: lora, adapter: full, path: full-d}}
          full-kohya: {{kind: lora, adapter: full, path: full-k, layout: kohya}}
          low: {{kind: lora, adapter: low, path: low, layout: kohya}}
          fused: {{kind: pipeline, path: fused}}
        """
    build_text(folder, textwrap.dedent(text), out="out")
    base_path = builtin_base_path("tiny-sd")
    base = {c: weights_of(base_path, c) for c in ("unet", "text_encoder")}
    combined: dict[tuple[str, str], torch.Tensor] = {}

    def add(key: tuple[str, str], delta: torch.Tensor) -> None:
        combined[key] = combined.get(key, torch.zeros_like(delta)) + delta

    for module in modules:
        key = (module.component, f"{module.module}.weight")
        assert module.delta is not None
        if module.dora is None:
            add(key, W_LYCO * module.delta)
        else:
            weight = base[key[0]][key[1]].double()
            add(key, W_LYCO * (dora_reference(weight, module.delta, *module.dora) - weight))
    for name, weight in (("style", W_STYLE), ("style", W_MERGE), ("detail", W_MERGE * 0.5)):
        for key, delta in lora_deltas(builtin_lora_path(f"tiny-sd/{name}"), base).items():
            add(key, weight * delta)
    return folder / "out", combined


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().reshape(want.shape) - want).norm() / want.norm())


def test_full_rank_extraction_reproduces_the_combined_delta_in_both_layouts(
    sd_extraction: tuple[Path, dict[tuple[str, str], torch.Tensor]],
) -> None:
    out, combined = sd_extraction
    base_path = builtin_base_path("tiny-sd")
    base = {c: weights_of(base_path, c) for c in ("unet", "text_encoder")}
    for file in (out / "full-d" / "pytorch_lora_weights.safetensors", out / "full-k" / "full.safetensors"):
        written = lora_deltas(file, base)
        assert written.keys() == combined.keys(), sorted(written.keys() ^ combined.keys())[:5]
        errors = {k: _relative(written[k], combined[k]) for k in combined}
        worst = max(errors, key=errors.__getitem__)
        assert errors[worst] < 2e-6, (
            file.name,
            worst,
            errors[worst],
            sorted(errors.items(), key=lambda x: -x[1])[:4],
        )
    report = json.loads((out / "manifest.json").read_text())["checks"]["extract"]["full"]
    assert len(report["modules"]) == len(combined) and report["max_relative_error"] < 2e-6
    assert report["zero_modules"] == []


def test_the_extracted_adapter_fuses_on_the_pipeline_route(
    sd_extraction: tuple[Path, dict[tuple[str, str], torch.Tensor]],
) -> None:
    """The streamer hands an extract merge to the pipeline route (it may read base weights)."""
    out, combined = sd_extraction
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["fused"]["executor"] == "diffusers"
    base_path = builtin_base_path("tiny-sd")
    for component in ("unet", "text_encoder"):
        base, fused = weights_of(base_path, component), weights_of(out / "fused", component)
        for key, tensor in fused.items():
            if (component, key) in combined:
                assert _relative(tensor.double() - base[key].double(), combined[(component, key)]) < 1e-5
            else:
                assert torch.equal(tensor, base[key]), key


def test_low_rank_extraction_reports_the_tail_energy_and_energy_ranks(
    sd_extraction: tuple[Path, dict[tuple[str, str], torch.Tensor]],
) -> None:
    out, _ = sd_extraction
    report = json.loads((out / "manifest.json").read_text())["checks"]["extract"]["low"]
    base_path = builtin_base_path("tiny-sd")
    base = {c: weights_of(base_path, c) for c in ("unet", "text_encoder")}
    oracle: dict[str, torch.Tensor] = {}
    for i, (component, name, shape, algorithm, dora) in enumerate(LYCO):
        module = make_module(component, name, shape, algorithm, seed=500 + 10 * i)
        assert module.delta is not None
        delta = module.delta
        if dora:
            add_dora(module, dora, seed=505 + 10 * i)
            assert module.dora is not None
            weight = base[component][f"{name}.weight"].double()
            delta = dora_reference(weight, module.delta, *module.dora) - weight
        oracle[f"{component}.{name}"] = delta
    assert report["modules"].keys() == oracle.keys()
    written = lora_deltas(out / "low" / "low.safetensors", base)
    for name, delta in oracle.items():
        s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1)).double()
        share = torch.cumsum(s**2, 0) / float((s**2).sum())
        rank = min(2, int((share < 0.9 - 1e-12).sum()) + 1)
        entry = report["modules"][name]
        assert entry["rank"] == rank, name
        assert abs(entry["relative_error"] - tail_error(delta, rank)) < 1e-5, name
        component, module = name.split(".", 1)
        assert (
            abs(_relative(written[(component, f"{module}.weight")], delta) - tail_error(delta, rank)) < 1e-5
        )


def test_extraction_is_deterministic_and_its_kohya_file_loads_in_diffusers(
    sd_extraction: tuple[Path, dict[tuple[str, str], torch.Tensor]], tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    out, combined = sd_extraction
    first = (out / "low" / "low.safetensors").read_bytes()
    again = textwrap.dedent(
        """\
        base: builtin:tiny-sd
        adapters: {lyco: {file: lyco.safetensors}}
        merges: {low: {method: extract, adapters: {lyco: 1.0}, svd_rank: 2, svd_energy: 0.9}}
        outputs: {low: {kind: lora, adapter: low, path: low, layout: kohya}}
        """
    )
    (tmp_path / "lyco.safetensors").write_bytes((out.parent / "lyco.safetensors").read_bytes())
    build_text(tmp_path, again, out="again")
    tensors = load_file(str(tmp_path / "again" / "low" / "low.safetensors"))
    assert tensors.keys() == load_file(str(out / "low" / "low.safetensors")).keys()
    assert all(torch.equal(v, load_file(str(out / "low" / "low.safetensors"))[k]) for k, v in tensors.items())
    assert len(first) > 0
    pipe = StableDiffusionPipeline.from_pretrained(builtin_base_path("tiny-sd"))
    pipe.load_lora_weights(str(out / "full-k" / "full.safetensors"), adapter_name="x")
    layers = [
        n for c in ("unet", "text_encoder") for n, m in getattr(pipe, c).named_modules()
        if isinstance(m, BaseTunerLayer)
    ]  # fmt: skip
    assert len(layers) == len(combined)


def test_flux_fused_qkv_lokr_extracts_into_a_kohya_file_with_bfl_names(tmp_path: Path) -> None:
    """A BFL-named LoKr on img_attn.qkv is narrowed onto to_q/to_k/to_v, extracted per part at full
    rank, and written back in kohya/ComfyUI layout as one fused qkv LoRA: read by ``lora_math``'s own
    BFL table, its deltas equal the LoKr's rows."""
    module = make_module("transformer", "qkv", (96, 32), "lokr-decomposed", seed=9)
    save_file(
        {f"lora_unet_double_blocks_0_img_attn_qkv.{k}": v for k, v in module.tensors.items()},
        str(tmp_path / "q.safetensors"),
    )
    text = """\
        base: builtin:tiny-flux
        adapters: {q: {file: q.safetensors}}
        merges: {x: {method: extract, adapters: [q], svd_rank: 32}}
        outputs: {lora: {kind: lora, adapter: x, path: lora, layout: kohya}}
        """
    build_text(tmp_path, textwrap.dedent(text), out="out")
    written = tmp_path / "out" / "lora" / "x.safetensors"
    assert all(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in load_file(str(written)))
    base = {"transformer": weights_of(builtin_base_path("tiny-flux"), "transformer")}
    deltas = lora_deltas(written, base)
    assert module.delta is not None
    for part, rows in zip(("to_q", "to_k", "to_v"), module.delta.split(32), strict=True):
        got = deltas[("transformer", f"transformer_blocks.0.attn.{part}.weight")]
        assert _relative(got, rows) < 2e-6, part


# ---------------------------------------------------------------------------------------------
# A checkpoint's difference from the base
# ---------------------------------------------------------------------------------------------


def _fine_tuned(folder: Path) -> dict[str, torch.Tensor]:
    """tiny-sd with rank-3 changes to three UNet weights and one text-encoder weight, and a changed
    bias (no LoRA can hold it); returns the changes by 'component.key'."""
    import shutil

    shutil.copytree(builtin_base_path("tiny-sd"), folder)
    changes = {
        "unet." + _A + "attn1.to_q.weight": rand(32, 3, seed=1) @ rand(3, 32, seed=2) * 0.1,
        "unet." + _A + "ff.net.0.proj.weight": rand(256, 3, seed=3) @ rand(3, 32, seed=4) * 0.1,
        "unet.down_blocks.0.resnets.0.conv1.weight": (rand(32, 3, seed=5) @ rand(3, 288, seed=6)).reshape(
            32, 32, 3, 3
        )
        * 0.1,
        "text_encoder.encoder.layers.1.mlp.fc2.weight": rand(32, 3, seed=7) @ rand(3, 37, seed=8) * 0.1,
        "unet.down_blocks.0.resnets.0.conv1.bias": torch.full((32,), 0.01),
    }
    for component in ("unet", "text_encoder"):
        (file,) = (folder / component).glob("*.safetensors")
        tensors = load_file(str(file))
        for name, change in changes.items():
            owner, key = name.split(".", 1)
            if owner == component:
                tensors[key] = tensors[key] + change
        save_file(tensors, str(file), metadata={"format": "pt"})
    return changes


def test_a_checkpoint_difference_extracts_into_the_lora_of_its_changes(tmp_path: Path) -> None:
    changes = _fine_tuned(tmp_path / "tuned")
    text = """\
        base: builtin:tiny-sd
        adapters: {tuned: {checkpoint: tuned}}
        merges: {x: {method: extract, adapters: {tuned: 0.5}, svd_rank: 3}}
        outputs: {lora: {kind: lora, adapter: x, path: lora, layout: kohya}}
        """
    build_text(tmp_path, textwrap.dedent(text), out="out")
    base = {c: weights_of(builtin_base_path("tiny-sd"), c) for c in ("unet", "text_encoder")}
    written = lora_deltas(tmp_path / "out" / "lora" / "x.safetensors", base)
    weights = {k: v for k, v in changes.items() if k.endswith(".weight")}
    assert {f"{c}.{k}" for c, k in written} == set(weights)
    for name, change in weights.items():
        component, key = name.split(".", 1)
        assert _relative(written[(component, key)], 0.5 * change.double()) < 1e-5, name
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["checks"]["extract"]["x"]
    assert report["max_relative_error"] < 1e-5 and len(report["modules"]) == 4
    assert list(report["not_representable"]) == ["unet.down_blocks.0.resnets.0.conv1.bias"]
    assert len(report["zero_modules"]) > 50  # every other Linear/Conv2d weight: unchanged
    from lorarecipe.gitops.lock import create_lock

    locked = next(i for i in create_lock(tmp_path / "recipe.yaml").inputs if i.step == "adapter:tuned")
    assert {f.path for f in locked.files} >= {
        "model_index.json",
        "unet/config.json",
        "text_encoder/config.json",
    }


def test_a_checkpoint_difference_is_only_an_input_of_extract(tmp_path: Path) -> None:
    from tests.helpers.recipes import messages, problems_of

    _fine_tuned(tmp_path / "tuned")
    text = """\
        base: builtin:tiny-sd
        adapters: {tuned: {checkpoint: tuned}, style: builtin:tiny-sd/style, flux: {checkpoint: flux}}
        merges: {m: {method: cat, adapters: [tuned, style]}}
        set_adapters: {adapters: [tuned]}
        fuse: {lora_scale: 1.0}
        outputs:
          fused: {kind: pipeline, path: fused}
          grid: {kind: grid, path: g.png, prompts: [x], variants: [tuned]}
        """
    import shutil

    shutil.copytree(builtin_base_path("tiny-flux"), tmp_path / "flux")
    found = messages(problems_of(tmp_path, text))
    assert (
        "adapters.flux.checkpoint: the checkpoint is FLUX.1 (model_index.json names FluxPipeline (FLUX.1)), the base SD 1.x: their difference is no adapter"
        in found
    )
    for where in ("merges.m.method", "set_adapters.adapters[0]", "outputs.grid.variants[0]"):
        assert any(m.startswith(f"{where}: 'tuned' is a checkpoint difference") for m in found), (
            where,
            found,
        )
