"""An output's ``dtype`` means one thing on both executors: fused in float32, rounded once, and stated.

For a base in one dtype and a checkpoint asked in another, the streaming fuser and the diffusers
pipeline route must (a) write weights fused in float32 and rounded once to the output dtype (checked
against W + Σ wᵢ·ΔWᵢ computed in float64 from the files, and bit-identical between the two routes),
and (b) write configs that state that dtype, so ``from_pretrained`` without a dtype loads what was
written (transformers 5 loads a text encoder in the dtype its config records; diffusers model configs
record none and load float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from tests.helpers.lora_math import lora_deltas, read_component_weights
from tests.helpers.recipes import build_text

COMPONENTS = ("unet", "text_encoder")
WEIGHTS = {"style": 0.9 * 0.8, "detail": 0.7 * 0.8}  # set_adapters weight × lora_scale

RECIPE = """\
base: {{path: base}}
adapters:
  style: builtin:tiny-sd/style
  detail: builtin:tiny-sd/detail
set_adapters: {{adapters: {{style: 0.9, detail: 0.7}}}}
fuse: {{lora_scale: 0.8}}
outputs: {{fused: {{kind: pipeline, path: fused, dtype: {dtype}}}}}
"""


def _base(folder: Path, dtype: torch.dtype) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(builtin_base_path("tiny-sd")), dtype=dtype)
    pipe.save_pretrained(folder / "base")
    return folder / "base"


def _spacing(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of ``dtype`` at ``magnitude``, in float64."""
    big = magnitude.to(dtype)
    return (torch.nextafter(big, torch.full_like(big, float("inf"))) - big).double()


@pytest.fixture(
    scope="module", params=[("float16", "float32"), ("float32", "float16")], ids=lambda p: "->".join(p)
)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A base in the first dtype, a pipeline output asked in the second, built by both executors."""
    stored, wanted = request.param
    folder = tmp_path_factory.mktemp(f"{stored}-to-{wanted}")
    _base(folder, getattr(torch, stored))
    for executor in ("streaming", "diffusers"):
        build_text(folder, RECIPE.format(dtype=wanted), out=executor, executor=executor)
    return folder, stored, wanted


@pytest.mark.parametrize("executor", ["streaming", "diffusers"])
def test_configs_state_the_written_dtype_and_load_as_written(
    built: tuple[Path, str, str], executor: str
) -> None:
    from diffusers import StableDiffusionPipeline

    folder, _, wanted = built
    out = folder / executor / "fused"
    dtype = getattr(torch, wanted)
    for component in ("unet", "text_encoder", "vae"):  # every weight file holds the output dtype
        for file in (out / component).glob("*.safetensors"):
            assert {t.dtype for t in load_file(str(file)).values() if t.is_floating_point()} == {dtype}, file
    config = json.loads((out / "text_encoder" / "config.json").read_text())
    assert config["dtype"] == wanted
    pipe = StableDiffusionPipeline.from_pretrained(str(out))  # no dtype argument
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {dtype}  # loaded by the config
    # diffusers models record no dtype and load as float32 (their documented default)
    for component in ("unet", "vae"):
        assert "dtype" not in json.loads((out / component / "config.json").read_text())
        assert {p.dtype for p in getattr(pipe, component).parameters()} == {torch.float32}


def test_both_executors_fuse_in_float32_and_round_once(built: tuple[Path, str, str]) -> None:
    """Against W + Σ wᵢ·ΔWᵢ in float64 (from the files): a float32 output is within float32 summation
    noise of it, a float16 one within half an ulp (+ that noise); the two routes are bit-identical.
    (Before, the pipeline route fused an fp16 base in fp16 and then cast: 1.2e-4 from exact.)"""
    folder, _, wanted = built
    dtype = getattr(torch, wanted)
    base = {c: read_component_weights(folder / "base", c) for c in COMPONENTS}
    deltas = {n: lora_deltas(builtin_lora_path(f"tiny-sd/{n}"), base) for n in WEIGHTS}
    fused_modules = 0
    for component in COMPONENTS:
        stream = read_component_weights(folder / "streaming" / "fused", component)
        pipe = read_component_weights(folder / "diffusers" / "fused", component)
        assert stream.keys() == pipe.keys() == base[component].keys()
        for key, tensor in stream.items():
            assert torch.equal(tensor, pipe[key]), (component, key)
            w = base[component][key].double()
            terms = [
                WEIGHTS[n] * deltas[n][(component, key)] for n in WEIGHTS if (component, key) in deltas[n]
            ]
            exact = w + sum(terms, torch.zeros_like(w))
            # float32 noise: the B@A products (rank ≤ 8 inner sums, cancellation included) and ≤ 3 sums,
            # bounded per tensor by 16 float32 ulps of its largest operand (measured: ≤ 2.1e-8 absolute)
            largest = max(float(w.abs().max()), *(float(t.abs().max()) for t in terms), 0.0)
            noise = 16 * 2.0**-24 * largest
            error = (tensor.double() - exact).abs()
            if dtype == torch.float32:
                assert float(error.max()) <= noise, (component, key, float(error.max()))
            else:
                assert ((error - noise).clamp(min=0) <= 0.5 * _spacing(exact.abs(), dtype)).all(), (
                    component,
                    key,
                )
            fused_modules += bool(terms)
    assert fused_modules > 20
