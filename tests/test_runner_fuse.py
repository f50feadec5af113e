"""Runner, fuse route: fused weights equal an independent computation from the LoRA files.

fused W == W + lora_scale · Σ wᵢ · (αᵢ/rᵢ) · BᵢAᵢ (fp32, ≤ 1e-6), for PEFT and kohya inputs,
SD1.5-like and SDXL-like bases, UNet and text encoders; unchanged weights stay bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from tests.helpers.lora_math import expected_fused, read_component_weights
from tests.helpers.recipes import build_text

CASES = {
    "tiny-sd": ("tiny-sd/style", "tiny-sd/detail", ("unet", "text_encoder")),
    "tiny-sdxl": ("tiny-sdxl/style", "tiny-sdxl/detail", ("unet", "text_encoder", "text_encoder_2")),
}


def _recipe(base: str, a: str, b: str, wa: float, wb: float, scale: float, extra: str = "") -> str:
    return f"""\
base: builtin:{base}
adapters:
  a: builtin:{a}
  b: builtin:{b}
set_adapters:
  adapters: {{a: {wa}, b: {wb}}}
fuse:
  lora_scale: {scale}
{extra}outputs:
  fused: {{kind: pipeline, path: fused}}
"""


def _check_fused(
    folder: Path, base: str, loras: list[tuple[Path, float]], scale: float, components: tuple[str, ...]
) -> int:
    base_dir = builtin_base_path(base)
    base_weights = {c: read_component_weights(base_dir, c) for c in components}
    expected = expected_fused(base_weights, loras, scale)
    touched = 0
    for comp in components:
        fused = read_component_weights(folder, comp)
        assert fused.keys() == base_weights[comp].keys()
        for key, tensor in fused.items():
            if (comp, key) in expected:
                diff = (tensor.double() - expected[(comp, key)]).abs().max().item()
                assert diff <= 1e-6, f"{comp}.{key}: {diff}"
                touched += 1
            else:
                assert torch.equal(tensor, base_weights[comp][key]), f"{comp}.{key} changed"
    return touched


@pytest.mark.parametrize("executor", ["streaming", "diffusers"])
@pytest.mark.parametrize("base", sorted(CASES))
def test_fused_weights_equal_independent_computation(tmp_path: Path, base: str, executor: str) -> None:
    a, b, components = CASES[base]
    build_text(tmp_path, _recipe(base, a, b, 0.7, -0.4, 0.8), executor=executor)
    touched = _check_fused(
        tmp_path / "out" / "fused",
        base,
        [(builtin_lora_path(a), 0.7), (builtin_lora_path(b), -0.4)],
        0.8,
        components,
    )
    assert touched > 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["outputs"]["fused"]["executor"] == executor
    check = manifest["checks"]["fuse"]["fused"]
    if executor == "diffusers":  # the post-fuse check counted exactly the weights the LoRAs apply to
        assert check["changed"] == check["expected"] == touched
    else:
        assert check["changed"] == touched


def test_weight_zero_is_the_base_and_components_subset(tmp_path: Path) -> None:
    a, b, _ = CASES["tiny-sd"]
    text = _recipe("tiny-sd", a, b, 0.0, 1.0, 1.0).replace(
        "  lora_scale: 1.0\n", "  lora_scale: 1.0\n  components: [unet]\n"
    )
    build_text(tmp_path, text)
    touched = _check_fused(
        tmp_path / "out" / "fused", "tiny-sd", [(builtin_lora_path(b), 1.0)], 1.0, ("unet",)
    )
    assert touched > 0
    te = read_component_weights(tmp_path / "out" / "fused", "text_encoder")
    base_te = read_component_weights(builtin_base_path("tiny-sd"), "text_encoder")
    assert all(torch.equal(te[k], base_te[k]) for k in te)  # not fused into the text encoder


def test_negative_weight_negates(tmp_path: Path) -> None:
    a, b, _ = CASES["tiny-sd"]
    build_text(tmp_path, _recipe("tiny-sd", a, b, 1.0, 0.0, 1.0), out="plus")
    build_text(tmp_path, _recipe("tiny-sd", a, b, -1.0, 0.0, 1.0), out="minus")
    base = read_component_weights(builtin_base_path("tiny-sd"), "unet")
    plus = read_component_weights(tmp_path / "plus" / "fused", "unet")
    minus = read_component_weights(tmp_path / "minus" / "fused", "unet")
    changed = 0
    for key in base:
        d_plus, d_minus = plus[key].double() - base[key].double(), minus[key].double() - base[key].double()
        assert (d_plus + d_minus).abs().max().item() <= 1e-6
        changed += int(d_plus.abs().max().item() > 0)
    assert changed > 0


PER_BLOCK = {  # a's per-block weight as written in the recipe, and as this test maps it (independently)
    "up-only": "{unet: {down: 0.0, mid: 0.0, up: 1.0}, text_encoder: 0.0}",
    "layers": "{unet: {down: 0.3, mid: 0.7, up: {block_1: [0.2, 1.1]}}, text_encoder: 0.5}",
}
EXPECTED_WEIGHT = {
    "up-only": {"down": 0.0, "mid": 0.0, "up": (1.0, 1.0), "text_encoder": 0.0},
    "layers": {"down": 0.3, "mid": 0.7, "up": (0.2, 1.1), "text_encoder": 0.5},
}


def _block_weight(weights: dict[str, object], component: str, key: str) -> float:
    """The per-block rule written out for tiny-sd (``block_out_channels=(32, 64)``: attentions in
    down_blocks.0, mid_block and up_blocks.1 (two, one per layer)): a module takes the weight of its
    block, an up-block list gives one weight per attention layer; text encoders take one number."""
    if component == "text_encoder":
        return float(weights["text_encoder"])  # type: ignore[arg-type]
    parts = key.split(".")
    assert "attentions" in parts, f"not an attention module: {key}"  # the only ones per-block weights reach
    if parts[0] == "down_blocks":
        return float(weights["down"])  # type: ignore[arg-type]
    if parts[0] == "mid_block":
        return float(weights["mid"])  # type: ignore[arg-type]
    assert parts[:2] == ["up_blocks", "1"], key
    return float(weights["up"][int(parts[3])])  # type: ignore[index]


@pytest.mark.parametrize("case", list(PER_BLOCK))
def test_per_block_weights_fuse_like_set_adapters(tmp_path: Path, case: str) -> None:
    """A per-block weight dict, fused, against (1) an independent computation W + s·Σ wᵢ(module)·ΔWᵢ
    with the block rule written out here, (2) the scalings diffusers' ``set_adapters`` gives the same
    dict at runtime (scaling = w(module)·α/r), and (3) the runtime pipeline's images (set_adapters +
    ``cross_attention_kwargs={"scale": s}``) against the fused pipeline's."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tests.helpers.lora_math import lora_deltas, lora_factors

    a, b, components = CASES["tiny-sd"]
    wb, scale = (0.0, 1.0) if case == "up-only" else (0.6, 0.8)
    text = _recipe("tiny-sd", a, b, 1.0, wb, scale).replace("{a: 1.0,", "{a: " + PER_BLOCK[case] + ",")
    build_text(tmp_path, text)
    base_dir = builtin_base_path("tiny-sd")
    base = {c: read_component_weights(base_dir, c) for c in components}
    deltas = {name: lora_deltas(builtin_lora_path(path), base) for name, path in (("a", a), ("b", b))}
    weights = EXPECTED_WEIGHT[case]
    changed: set[tuple[str, str]] = set()
    for comp in components:
        fused = read_component_weights(tmp_path / "out" / "fused", comp)
        for key, tensor in fused.items():
            terms = []
            if (comp, key) in deltas["a"]:
                terms.append(_block_weight(weights, comp, key) * deltas["a"][(comp, key)])
            if (comp, key) in deltas["b"]:
                terms.append(wb * deltas["b"][(comp, key)])
            want = base[comp][key].double() + scale * sum(terms, torch.zeros_like(base[comp][key].double()))
            assert (tensor.double() - want).abs().max().item() <= 1e-6, (comp, key)
            if not torch.equal(tensor, base[comp][key]):
                changed.add((comp, key))
    if case == "up-only":  # b at 0 and a only in the up blocks: only up-block modules change
        assert changed and all(c == "unet" and k.startswith("up_blocks.") for c, k in changed)

    # (2) diffusers' runtime scalings for the same dict: w(module) · α/r, module by module
    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir))
    pipe.set_progress_bar_config(disable=True)
    for name, path in (("a", a), ("b", b)):
        pipe.load_lora_weights(str(builtin_lora_path(path)), adapter_name=name)
    block = {"a": (lambda c, k: _block_weight(weights, c, k)), "b": (lambda c, k: wb)}
    pipe.set_adapters(["a", "b"], adapter_weights=[yaml.safe_load(PER_BLOCK[case]), wb])
    factors = {name: lora_factors(builtin_lora_path(path), base) for name, path in (("a", a), ("b", b))}
    checked = 0
    for comp in components:
        for module_name, module in getattr(pipe, comp).named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            key = f"{module_name}.weight"
            for name in ("a", "b"):
                if (comp, key) in factors[name]:
                    f = factors[name][(comp, key)]
                    assert module.scaling[name] == pytest.approx(
                        block[name](comp, key) * f.alpha / f.rank, abs=1e-12
                    )
                    checked += 1
    assert checked > 40

    # (3) the runtime mix at lora_scale renders like the fused pipeline
    def render(p: StableDiffusionPipeline, **extra: object) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(0)
        out = p(
            "a photo of a cat",
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=generator,
            **extra,
        )
        return torch.from_numpy(out.images)

    runtime = render(pipe, cross_attention_kwargs={"scale": scale})
    fused_pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out" / "fused"))
    fused_pipe.set_progress_bar_config(disable=True)
    assert (runtime - render(fused_pipe)).abs().max().item() <= 1e-4


def test_fp16_base_is_not_upcast(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(builtin_base_path("tiny-sd")), torch_dtype=torch.float16
    )
    pipe.save_pretrained(tmp_path / "base16")
    text = _recipe("tiny-sd", *CASES["tiny-sd"][:2], 1.0, 1.0, 1.0).replace(
        "base: builtin:tiny-sd", "base: {path: base16}"
    )
    build_text(tmp_path, text)
    fused = read_component_weights(tmp_path / "out" / "fused", "unet")
    assert {t.dtype for t in fused.values()} == {torch.float16}


def test_streaming_refusal_falls_back_only_in_auto_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal (``StreamingUnsupported``) hands the output to the pipeline executor in auto mode,
    and is an error with ``--executor streaming``."""
    from lorarecipe.errors import StreamingUnsupported
    from lorarecipe.runner.streaming import stream as streaming

    def refuse(*args: object, **kwargs: object) -> None:
        raise StreamingUnsupported("the streaming fuser does not support this adapter")

    monkeypatch.setattr(streaming, "stream_fuse", refuse)
    a, b, _ = CASES["tiny-sd"]
    text = _recipe("tiny-sd", a, b, 1.0, 1.0, 1.0)
    build_text(tmp_path, text)  # auto: the pipeline route takes over
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["outputs"]["fused"]["executor"] == "diffusers"
    with pytest.raises(StreamingUnsupported, match="does not support"):
        build_text(tmp_path, text, out="strict", executor="streaming")
    assert not (tmp_path / "strict" / "fused").exists()


@pytest.mark.parametrize("error", ["BuildError", "UnsafeInputError", "RuntimeError"])
def test_a_streaming_error_that_is_not_a_refusal_fails_the_build_in_auto_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    """NaN/Inf, a truncated file or an internal check fail the build; the pipeline route is never
    tried behind the user's back, and no output or manifest is written."""
    from lorarecipe import errors
    from lorarecipe.runner.pipeline import PipelineExecutor
    from lorarecipe.runner.streaming import stream as streaming

    exc_type = getattr(errors, error, RuntimeError)

    def fail(*args: object, **kwargs: object) -> None:
        raise exc_type("fused weight unet.x contains NaN/Inf")

    def never(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("the pipeline executor must not be tried")

    monkeypatch.setattr(streaming, "stream_fuse", fail)
    monkeypatch.setattr(PipelineExecutor, "build", never)
    a, b, _ = CASES["tiny-sd"]
    with pytest.raises(errors.BuildError, match="NaN/Inf") as info:
        build_text(tmp_path, _recipe("tiny-sd", a, b, 1.0, 1.0, 1.0))
    assert not isinstance(info.value, errors.ExecutorRefusal)
    assert info.value.problems[0].path == "outputs.fused"  # located at the output's recipe line
    assert not (tmp_path / "out" / "fused").exists()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["outputs"] == {} and manifest["build_complete"] is False  # true: nothing was built


def test_executors_hand_on_what_they_leave(tmp_path: Path) -> None:
    """The runner offers every output to each executor of the mode in order and each builds what it
    can: the streamer takes the checkpoints, the pipeline the grid and the LoRA file."""
    from lorarecipe.plan import SaveCheckpoint
    from lorarecipe.runner.executor import executors_for
    from lorarecipe.runner.pipeline import PipelineExecutor
    from lorarecipe.runner.streaming import StreamingExecutor

    assert [type(e) for e in executors_for("auto")] == [StreamingExecutor, PipelineExecutor]
    assert [type(e) for e in executors_for("diffusers")] == [PipelineExecutor]
    a, b, _ = CASES["tiny-sd"]
    text = _recipe("tiny-sd", a, b, 0.5, 0.5, 1.0).replace(
        "outputs:\n",
        "outputs:\n  lora: {kind: lora, adapter: a, path: lora}\n"
        "  ckpt: {kind: single_file, path: x.safetensors}\n"
        "  grid: {kind: grid, path: g.png, prompts: [a cat], steps: 1, variants: [base]}\n",
    )
    result = build_text(tmp_path, text)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    executors = {name: doc["executor"] for name, doc in manifest["outputs"].items()}
    assert executors == {"fused": "streaming", "ckpt": "streaming", "lora": "diffusers", "grid": "diffusers"}
    assert {s.output for s in result.plan.of_type(SaveCheckpoint)} == set(manifest["checks"]["fuse"])
