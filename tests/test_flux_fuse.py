"""FLUX.1 fused checkpoints on the built-in tiny-flux: both executors, against independent math.

- every LoRA layout at once (PEFT + CLIP, kohya BFL with fused qkv/linear1/final layer + CLIP,
  ai-toolkit, XLabs), weights (one negative) and lora_scale: the fused folder equals
  W + s·Σ wᵢ(αᵢ/rᵢ)BᵢAᵢ read from the files by ``tests.helpers.lora_math`` (float64), nothing else
  changed, and the streaming executor is bit-identical to the pipeline route (float32);
- per-block weights (``double_blocks``/``single_blocks`` ranges, ``default``): each module's weight
  is recomputed here from the spec with this file's own block parsing; both executors agree bit for
  bit, also when the stream takes the LoRA factors from its cache;
- adapter subsets and components; a bfloat16 base (stream within half an ulp of exact);
- per-block spec errors, each at its place with a hint.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.compiler import compile_recipe
from lorarecipe.outputs.safetensors_meta import read_metadata
from lorarecipe.recipe.load import load_recipe
from lorarecipe.runner import run_plan
from tests.helpers.lora_math import lora_deltas, read_component_weights
from tests.helpers.recipes import messages, problems_of, write_recipe
from tests.test_streaming import _assert_identical, _both, _stream

COMPONENTS = ("transformer", "text_encoder")
ALL_LAYOUTS = """\
    base: builtin:tiny-flux
    adapters:
      style: builtin:tiny-flux/style
      detail: builtin:tiny-flux/detail
      aitk: builtin:tiny-flux/aitk
      xlabs: builtin:tiny-flux/xlabs
    set_adapters:
      adapters: {style: 0.7, detail: -0.6, aitk: 1.3, xlabs: 0.4}
    fuse: {lora_scale: 0.8}
    outputs:
      fused: {kind: pipeline, path: fused}
    """


def _base(folder: Path | None = None) -> dict[str, dict[str, torch.Tensor]]:
    root = folder or builtin_base_path("tiny-flux")
    return {c: read_component_weights(root, c) for c in COMPONENTS}


def _check_fused(
    folder: Path, base: dict[str, dict[str, torch.Tensor]], terms: dict[tuple[str, str], torch.Tensor]
) -> None:
    """fused == base + Σ terms where a term exists (float64 → atol 1e-5), bit-equal elsewhere."""
    for component in COMPONENTS:
        for key, tensor in read_component_weights(folder, component).items():
            original = base[component][key]
            if (component, key) in terms:
                expected = original.double() + terms[(component, key)]
                torch.testing.assert_close(
                    tensor.double(), expected, atol=1e-5, rtol=0, msg=f"{component}.{key}"
                )
                assert not torch.equal(tensor, original)
            else:
                assert torch.equal(tensor, original), f"{component}.{key} changed"


def _weighted(
    loras: dict[str, float], base: dict[str, dict[str, torch.Tensor]]
) -> dict[tuple[str, str], torch.Tensor]:
    out: dict[tuple[str, str], torch.Tensor] = {}
    for name, weight in loras.items():
        for key, delta in lora_deltas(builtin_lora_path(f"tiny-flux/{name}"), base).items():
            out[key] = out.get(key, torch.zeros_like(delta)) + weight * delta
    return out


def test_every_layout_fuses_exactly_on_both_executors(tmp_path: Path) -> None:
    reports = _both(tmp_path, ALL_LAYOUTS)
    base = _base()
    terms = _weighted({"style": 0.7 * 0.8, "detail": -0.6 * 0.8, "aitk": 1.3 * 0.8, "xlabs": 0.4 * 0.8}, base)
    assert any(k == ("transformer", "norm_out.linear.weight") for k in terms)  # the swapped final layer
    _check_fused(tmp_path / "stream" / "fused", base, terms)
    assert reports["fused"].changed == len(terms) and reports["fused"].max_abs_diff_vs_fp32 == 0.0


# ---- per-block weights ---------------------------------------------------------------------------

BLOCKS = {
    "style": {"double_blocks": {"0": 0.5, "1": -0.3}, "single_blocks": {"1": 2.0}, "default": 0.25},
    "detail": {"double_blocks": 1.5, "single_blocks": {"0-1": 0.0}},
}


def _block_weight(spec: dict[str, object], module: str) -> float:
    """This test's own reading of a per-block spec: FLUX.1 double blocks are diffusers'
    transformer_blocks.N, single blocks single_transformer_blocks.N; the rest takes the default."""
    default = float(spec.get("default", 1.0))  # type: ignore[arg-type]
    found = re.match(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.", module)
    if found is None:
        return default
    group = spec.get("single_blocks" if found[1] == "single_transformer_blocks" else "double_blocks")
    if group is None:
        return default
    if not isinstance(group, dict):
        return float(group)  # type: ignore[arg-type]
    index = int(found[2])
    for key, weight in group.items():
        low, _, high = key.partition("-")
        if int(low) <= index <= int(high or low):
            return float(weight)
    return default


def _block_recipe(style: dict[str, object], detail: dict[str, object], scale: float) -> str:
    def flow(value: object) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
        return str(value)

    return f"""\
        base: builtin:tiny-flux
        adapters:
          style: builtin:tiny-flux/style
          detail: builtin:tiny-flux/detail
        set_adapters:
          adapters:
            style: {{transformer: {flow(style)}, text_encoder: 0.6}}
            detail: {{transformer: {flow(detail)}}}
        fuse: {{lora_scale: {scale}}}
        outputs:
          fused: {{kind: pipeline, path: fused}}
        """


def _expected_blocks(
    style: dict[str, object], detail: dict[str, object], scale: float
) -> dict[tuple[str, str], torch.Tensor]:
    base = _base()
    out: dict[tuple[str, str], torch.Tensor] = {}
    for name, spec in (("style", style), ("detail", detail)):
        for (component, key), delta in lora_deltas(builtin_lora_path(f"tiny-flux/{name}"), base).items():
            if component == "transformer":
                weight = _block_weight(spec, key.removesuffix(".weight"))
            else:
                weight = 0.6 if name == "style" else 1.0
            out[(component, key)] = (
                out.get((component, key), torch.zeros_like(delta)) + scale * weight * delta
            )
    return out


def test_per_block_weights_on_both_executors(tmp_path: Path) -> None:
    _both(tmp_path, _block_recipe(BLOCKS["style"], BLOCKS["detail"], 0.9))
    expected = _expected_blocks(BLOCKS["style"], BLOCKS["detail"], 0.9)
    # single_blocks.1 of style ×2, detail's single blocks ×0 and everything outside blocks ×0.25
    base = _base()
    zero = {k for k, v in expected.items() if not v.any()}
    assert ("transformer", "single_transformer_blocks.0.proj_out.weight") not in zero  # style's default
    _check_fused(tmp_path / "stream" / "fused", base, {k: v for k, v in expected.items() if k not in zero})


def test_per_block_weights_from_the_factor_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second fuse with other block weights reads the factors from the cache (no diffusers) and
    still equals the pipeline route bit for bit."""
    monkeypatch.setenv("LORARECIPE_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "first"
    first.mkdir()
    _both(first, _block_recipe(BLOCKS["style"], BLOCKS["detail"], 0.9))
    other = {"double_blocks": {"1": 0.75}, "single_blocks": -1.0}
    second = tmp_path / "second"
    second.mkdir()
    loaded = load_recipe(write_recipe(second, textwrap.dedent(_block_recipe(other, {"default": 0.5}, 1.0))))
    plan = compile_recipe(loaded)
    reports = _stream(second, plan, loaded.text)
    assert all(report.factors_cached for report in reports.values())
    run_plan(
        plan, out_root=second / "pipe", recipe_root=loaded.root, recipe_text=loaded.text, executor="diffusers"
    )
    _assert_identical(second, plan)
    _check_fused(second / "stream" / "fused", _base(), _expected_blocks(other, {"default": 0.5}, 1.0))


def test_adapter_subset_and_components(tmp_path: Path) -> None:
    """fuse.adapters takes its weights from the mix; fuse.components leaves the text encoder alone."""
    _both(
        tmp_path,
        """\
        base: builtin:tiny-flux
        adapters:
          style: builtin:tiny-flux/style
          detail: builtin:tiny-flux/detail
          xlabs: builtin:tiny-flux/xlabs
        set_adapters: {adapters: {style: 0.5, detail: 0.9, xlabs: 2.0}}
        fuse: {adapters: [detail, xlabs], lora_scale: 0.5, components: [transformer]}
        outputs:
          fused: {kind: pipeline, path: fused}
        """,
    )
    base = _base()
    terms = {
        k: v for k, v in _weighted({"detail": 0.45, "xlabs": 1.0}, base).items() if k[0] == "transformer"
    }
    _check_fused(tmp_path / "stream" / "fused", base, terms)


def _spacing(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    big = magnitude.to(dtype)
    return (torch.nextafter(big, torch.full_like(big, float("inf"))) - big).double()


def test_bfloat16_base_rounds_once(tmp_path: Path) -> None:
    """A bfloat16 FLUX.1 base and bfloat16 LoRA files (as published): the stream is within half an ulp
    of the exact result; the pipeline route, which rounds each delta, within 2 ulps of the stream."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(builtin_base_path("tiny-flux")), dtype=torch.bfloat16)
    pipe.save_pretrained(tmp_path / "base")
    for name in ("style", "detail"):
        source = builtin_lora_path(f"tiny-flux/{name}")
        tensors = {
            k: v if k.endswith(".alpha") else v.to(torch.bfloat16) for k, v in load_file(str(source)).items()
        }
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=read_metadata(source))
    _both(
        tmp_path,
        """\
        base: {path: base}
        adapters: {a: {file: style.safetensors}, b: {file: detail.safetensors}}
        set_adapters: {adapters: {a: 0.9, b: 0.7}}
        fuse: {lora_scale: 0.8}
        outputs: {fused: {kind: pipeline, path: fused}}
        """,
        identical=False,
    )
    base = _base(tmp_path / "base")
    deltas = {n: lora_deltas(tmp_path / f"{n}.safetensors", base) for n in ("style", "detail")}
    weights = {"style": 0.9 * 0.8, "detail": 0.7 * 0.8}
    worst_stream = worst_pipe = 0.0
    for component in COMPONENTS:
        ours = read_component_weights(tmp_path / "stream" / "fused", component)
        theirs = read_component_weights(tmp_path / "pipe" / "fused", component)
        for key, tensor in ours.items():
            w = base[component][key].double()
            parts = [weights[n] * deltas[n].get((component, key), torch.zeros_like(w)) for n in weights]
            if not any(p.any() for p in parts):
                assert torch.equal(tensor, base[component][key]) and torch.equal(theirs[key], tensor)
                continue
            exact = w + sum(parts)
            x, y = tensor.double(), theirs[key].double()
            operands = torch.stack(
                [w.abs(), *(p.abs() for p in parts), (w + parts[0]).abs(), x.abs(), y.abs()]
            ).amax(0)
            noise = 2**-20 * operands  # the stream sums in float32 before its one rounding
            error = ((x - exact).abs() - noise).clamp(min=0) / _spacing(x.abs(), torch.bfloat16)
            worst_stream = max(worst_stream, float(error.max()))
            worst_pipe = max(worst_pipe, float(((x - y).abs() / _spacing(operands, torch.bfloat16)).max()))
    assert worst_stream <= 0.5 + 1e-3
    assert worst_pipe <= 2.0


def test_per_block_errors_are_located(tmp_path: Path) -> None:
    text = """\
        base: builtin:tiny-flux
        adapters:
          style: builtin:tiny-flux/style
        set_adapters:
          adapters:
            style:
              transformer:
                double_blocks: {0-1: 0.5, 1: 0.2, 2: 1.0, 3-x: 1.0}
                singel_blocks: 0.5
                transformer_blocks: 1.0
                default: {0: 1.0}
        outputs:
          grid: {kind: grid, path: g.png, prompts: [a cat], variants: [mix]}
        """
    found = problems_of(tmp_path, text)
    lines = [(p.span.line if p.span else None, m) for p, m in zip(found, messages(found), strict=True)]
    assert lines == [
        (
            8,
            "set_adapters.adapters.style.transformer.double_blocks.3-x: '3-x' is not a block index or range "
            "[write 3, or 0-9 (inclusive)]",
        ),
        (
            8,
            "set_adapters.adapters.style.transformer.double_blocks.1: blocks 1 overlap 0-1 in double_blocks "
            "[give each block one weight]",
        ),
        (
            9,
            "set_adapters.adapters.style.transformer.singel_blocks: FLUX.1 has no block group 'singel_blocks' "
            "[did you mean 'single_blocks'?]",
        ),
        (
            10,
            "set_adapters.adapters.style.transformer.transformer_blocks: FLUX.1 has no block group "
            "'transformer_blocks' [write 'double_blocks' (diffusers calls it 'transformer_blocks')]",
        ),
        (11, "set_adapters.adapters.style.transformer.default: 'default' takes one weight, not a mapping"),
    ]
    assert [(p.span.col if p.span else None) for p in found[:2]] == [51, 35]  # on the keys themselves
    in_range = text.replace("{0-1: 0.5, 1: 0.2, 2: 1.0, 3-x: 1.0}", "{0: 0.5, 1-2: 0.2}")
    in_range = "\n".join(
        line for line in in_range.splitlines() if "blocks: 1.0" not in line and "singel" not in line
    )
    in_range = in_range.replace("default: {0: 1.0}", "default: 0.5")
    assert messages(problems_of(tmp_path, in_range)) == [
        "set_adapters.adapters.style.transformer.double_blocks.1-2: block 2 is out of range: the model has 2 "
        "double_blocks (0-1)"
    ]
