"""Runner, fuse route: fused weights equal an independent computation from the LoRA files.

fused W == W + lora_scale · Σ wᵢ · (αᵢ/rᵢ) · BᵢAᵢ (fp32, ≤ 1e-6), for PEFT and kohya inputs,
SD1.5-like and SDXL-like bases, UNet and text encoders; unchanged weights stay bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def test_per_block_weights_fuse_like_set_adapters(tmp_path: Path) -> None:
    """A {unet: {down: 0, up: 1}} weight fuses only the up-block LoRA modules."""
    a, b, _ = CASES["tiny-sd"]
    text = _recipe("tiny-sd", a, b, 1.0, 1.0, 1.0).replace(
        "adapters: {a: 1.0, b: 1.0}",
        "adapters: {a: {unet: {down: 0.0, mid: 0.0, up: 1.0}, text_encoder: 0.0}, b: 0.0}",
    )
    build_text(tmp_path, text)
    base = read_component_weights(builtin_base_path("tiny-sd"), "unet")
    fused = read_component_weights(tmp_path / "out" / "fused", "unet")
    changed = {k for k in base if not torch.equal(base[k], fused[k])}
    assert changed and all(k.startswith("up_blocks.") for k in changed)


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
