"""The streaming fuser's LoRA-factor form and its cache.

- ``scaled_delta`` equals PEFT's ``get_delta_weight`` bit for bit (Linear, 1×1 and 3×3 Conv2d) and
  ``native_scaling`` equals PEFT's ``set_scale`` + ``scale_layer`` (plain and rsLoRA).
- A second fuse with the same LoRA files reads the factors from the cache, without importing
  diffusers, transformers or PEFT, and writes the same bytes as a fuse without the cache, also with
  other set_adapters weights and lora_scale, merges, text encoders and single-file outputs.
- Damaged entries are misses; per-block weights always go through diffusers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lorarecipe.compiler import compile_recipe
from lorarecipe.recipe.load import load_recipe
from lorarecipe.runner.fuse_math import FuseTerm, native_scaling, scaled_delta
from lorarecipe.runner.streaming.factors import factors_from_model
from tests.helpers.recipes import write_recipe
from tests.test_streaming import _stream

REPO = Path(__file__).resolve().parents[1]


def _peft_model(r: int, alpha: float, rslora: bool) -> torch.nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(r)
    model = torch.nn.ModuleDict(
        {"lin": torch.nn.Linear(96, 80), "pw": torch.nn.Conv2d(64, 48, 1), "conv": torch.nn.Conv2d(32, 40, 3)}
    )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        target_modules=["lin", "pw", "conv"],
        init_lora_weights=False,
    )
    return inject_adapter_in_model(config, model, adapter_name="a")


@pytest.mark.parametrize(("r", "alpha", "rslora"), [(4, 3.0, False), (8, 16, False), (16, 7.3, True)])
@pytest.mark.parametrize(("weight", "lora_scale"), [(1.0, 1.0), (0.8, 0.7), (-0.37, 1.9), (0.0, 0.5)])
def test_deltas_and_scalings_equal_peft(
    r: int, alpha: float, rslora: bool, weight: float, lora_scale: float
) -> None:
    model = _peft_model(r, alpha, rslora)
    factors = factors_from_model("unet", model, ["a"])["a"]
    assert {k[1]: f.kind for k, f in factors.items()} == {"lin": "linear", "pw": "conv1x1", "conv": "conv"}
    for name in ("lin", "pw", "conv"):
        layer = model[name]
        layer.set_scale("a", weight)
        layer.scale_layer(lora_scale)
        factor = factors[("unet", name)]
        scaling = native_scaling(factor, weight, lora_scale)
        assert scaling == layer.scaling["a"], name  # bit for bit, not approximately
        with torch.no_grad():
            assert torch.equal(scaled_delta(FuseTerm("a", factor, scaling)), layer.get_delta_weight("a")), (
                name
            )


RECIPE = """\
base: builtin:{base}
adapters:
  a: {{builtin: {base}/style}}
  b: {{builtin: {base}/detail}}
{merge}set_adapters:
  adapters: {{{mix}}}
fuse: {{lora_scale: {scale}{fuse}}}
outputs:
  fused: {{kind: pipeline, path: fused}}
{single}"""


def _build(folder: Path, out: str, **fields: str) -> list[bool]:
    """Stream-fuse the recipe into folder/out; per output (folder, single file): whether the factors
    came from the cache (the second output of a cold build reuses what the first one stored)."""
    defaults = {
        "base": "tiny-sd",
        "merge": "",
        "mix": "a: 0.8, b: -0.5",
        "scale": "0.7",
        "single": SINGLE,
        "fuse": "",
    }
    text = RECIPE.format(**{**defaults, **fields})
    loaded = load_recipe(write_recipe(folder, textwrap.dedent(text)))
    reports = _stream(folder, compile_recipe(loaded), loaded.text, out)
    return [report.factors_cached for report in reports.values()]


def _same_bytes(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


SINGLE = "  single: {kind: single_file, path: single.safetensors, dtype: float16}\n"
XL = {"base": "tiny-sdxl", "single": ""}  # the tiny SDXL's text encoders are too alike for one file
CASES = {
    "sd-weights": ({}, {"mix": "a: 1.3, b: 0.25", "scale": "1.0"}),
    "sd-merge": (
        {
            "merge": "merges:\n  m: {method: dare_ties_svd, adapters: {a: 0.6, b: 0.9}, density: 0.5}\n",
            "mix": "m: 0.9",
        },
        {
            "merge": "merges:\n  m: {method: dare_ties_svd, adapters: {a: 0.6, b: 0.9}, density: 0.5}\n",
            "mix": "m: -0.4",
        },
    ),
    "sdxl": (XL, {**XL, "mix": "a: 0.1, b: 1.0", "scale": "1.5"}),
    # the factors are cached for every component, whichever ones the first fuse took
    "components": ({"fuse": ", components: [unet]"}, {"mix": "a: 0.5, b: 0.5"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_factors_give_the_same_bytes(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cold, warm and warm-with-other-weights builds; each warm output equals a cold build of it."""
    first, second = CASES[case]
    monkeypatch.setenv("LORARECIPE_CACHE", str(tmp_path / "cache"))
    cold = _build(tmp_path, "cold", **first)
    assert cold[0] is False and all(cold[1:])
    assert all(_build(tmp_path, "warm", **first))
    _same_bytes(tmp_path / "cold", tmp_path / "warm")
    assert all(_build(tmp_path, "warm2", **second))
    monkeypatch.setenv("LORARECIPE_CACHE", str(tmp_path / "empty"))
    assert not _build(tmp_path, "cold2", **second)[0]
    _same_bytes(tmp_path / "cold2", tmp_path / "warm2")
    weights = "fused/unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "cold2" / weights).read_bytes() != (tmp_path / "cold" / weights).read_bytes()


def test_damaged_entries_are_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORARECIPE_CACHE", str(tmp_path / "cache"))
    _build(tmp_path, "cold")
    entries = sorted((tmp_path / "cache" / "factors").rglob("*.safetensors"))
    architectures = sorted((tmp_path / "cache" / "factors" / "architectures").glob("*.json"))
    assert len(entries) == 2 and len(architectures) == 1
    entries[0].write_bytes(entries[0].read_bytes()[:-100])  # truncated
    architectures[0].write_text("{")
    assert _build(tmp_path, "again") == [False, True]
    _same_bytes(tmp_path / "cold", tmp_path / "again")
    assert _build(tmp_path, "warm") == [True, True]  # rewritten by the cold build


def test_per_block_weights_always_go_through_diffusers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORARECIPE_CACHE", str(tmp_path / "cache"))
    per_block = "a: {unet: {down: 0.3, up: 1.2}}, b: 0.5"
    assert _build(tmp_path, "one", mix=per_block) == [False, False]
    assert _build(tmp_path, "two", mix=per_block) == [False, False]
    _same_bytes(tmp_path / "one", tmp_path / "two")


def test_a_warm_build_imports_no_diffusers_peft_or_transformers(tmp_path: Path) -> None:
    """The point of the cache: a warm ``lorarecipe build`` (new weights, same LoRA files) streams
    paying for torch only, and says so."""
    code = textwrap.dedent(
        """
        import json, sys
        from lorarecipe.cli import main
        code = main(["build", sys.argv[1], "--out", sys.argv[2]])
        heavy = [m for m in ("diffusers", "peft", "transformers", "accelerate") if m in sys.modules]
        print(json.dumps({"code": code, "heavy": heavy}))
        """
    )
    env = {**os.environ, "LORARECIPE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    runs = []
    for out, mix in (("cold", "a: 0.8, b: -0.5"), ("warm", "a: 1.1, b: 0.3")):
        text = RECIPE.format(base="tiny-sd", merge="", mix=mix, scale="0.7", single="", fuse="")
        recipe = write_recipe(tmp_path, text)
        done = subprocess.run(
            [sys.executable, "-c", code, str(recipe), str(tmp_path / out)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            check=False,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["code"] == 0, done.stderr[-3000:]
        runs.append((result["heavy"], "LoRA factors from the cache" in done.stderr))
    assert runs[0][0] and not runs[0][1]  # cold: diffusers decides
    assert runs[1] == ([], True)
    for out, cached in (("cold", False), ("warm", True)):
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        assert manifest["checks"]["fuse"]["fused"]["lora_factors_from_cache"] is cached
