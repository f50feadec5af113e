"""Qwen-Image, Z-Image and SD 3 on their built-in tiny pipelines, against independent math.

For each family (``FAMILIES`` below: its built-in, its LoRAs in every layout its loader reads, its
block groups as this file reads them):

- fuse: every layout at once (PEFT; kohya in diffusers names or in the original names with fused
  q/k/v; ai-toolkit ``diffusion_model.``; DiffSynth ``default.``; bare names with alphas), one
  negative weight, per-block weights on one adapter and ``lora_scale``: the fused folder equals
  W + s·Σ wᵢ(module)·(αᵢ/rᵢ)BᵢAᵢ read from the files by ``tests.helpers.lora_math`` (float64), with each
  module's block weight recomputed here from the spec, nothing else changed; the streaming executor
  is bit-identical to the pipeline route (float32), and within half a bfloat16 ulp of the exact value
  on a bfloat16 base;
- single file: the family's original layout (SD 3 ``model.diffusion_model.joint_blocks…`` with fused
  q/k/v, Z-Image ``layers.N.attention.qkv``, Qwen-Image diffusers names), written identically by both
  executors, read back bit for bit by diffusers' ``from_single_file``, and usable as a base again;
- LoRA files: merges and loaded adapters in the diffusers layout and the kohya/ComfyUI layout reload
  into a fresh pipeline with every module applied and the deltas they were written from;
- grids: rendered, with the family's call conventions (Qwen-Image: ``true_cfg_scale`` and a negative
  prompt, ``attention_kwargs``; the others ``guidance_scale`` and ``joint_attention_kwargs``);
- LyCORIS (LoKr, LoHa) and DoRA files in the kohya, LyCORIS and PEFT layouts, fused against
  lycoris.functional on both executors;
- static checks: per-block spec errors at their place, a LoRA of a sibling family
  refused naming both, Qwen-Image-Edit grids refused with the reason.
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline, QwenImagePipeline, StableDiffusion3Pipeline, ZImagePipeline
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.outputs.safetensors_meta import read_metadata
from lorarecipe.runner.pipeline.adapters import load_adapter
from tests.helpers.lora_math import lora_deltas, read_component_weights
from tests.helpers.recipes import build_text, messages, problems_of
from tests.test_streaming import _both


@dataclass(frozen=True)
class Fam:
    key: str
    base: str
    weights: dict[str, float]  # adapter -> weight: one adapter per layout the family's loader reads
    blocks: dict[str, Any]  # per-block transformer weights of the 'detail' adapter
    groups: dict[str, str]  # block group -> diffusers module prefix (this file's own reading)
    components: tuple[str, ...]
    pipeline: type
    single_keys: tuple[str, ...]  # keys the original single-file layout must hold


FAMILIES = {
    "qwen_image": Fam(
        "qwen_image",
        "tiny-qwen-image",
        {"style": 0.7, "detail": -0.6, "aitk": 1.3, "diffsynth": 0.4, "bare": 0.9},
        {"transformer_blocks": {"0": 0.5, "1": -0.3}, "default": 0.25},
        {"transformer_blocks": "transformer_blocks"},
        ("transformer",),
        QwenImagePipeline,
        ("transformer_blocks.1.img_mod.1.weight", "img_in.weight", "txt_norm.weight"),
    ),
    "z_image": Fam(
        "z_image",
        "tiny-z-image",
        {"style": 0.7, "detail": -0.6, "aitk": 1.3, "comfy": 0.4},
        {"layers": {"0": 0.5, "1": -0.3}, "noise_refiner": 2.0, "default": 0.25},
        {"layers": "layers", "noise_refiner": "noise_refiner", "context_refiner": "context_refiner"},
        ("transformer",),
        ZImagePipeline,
        (
            "layers.1.attention.qkv.weight",
            "noise_refiner.0.attention.out.weight",
            "context_refiner.0.attention.q_norm.weight",
            "x_embedder.weight",
            "final_layer.adaLN_modulation.1.weight",
            "layers.0.feed_forward.w2.weight",
        ),
    ),
    "sd3": Fam(
        "sd3",
        "tiny-sd3",
        {"style": 0.7, "detail": -0.6, "toy": 1.3},
        {"joint_blocks": {"0": 0.5, "1": -0.3}, "default": 0.25},
        {"joint_blocks": "transformer_blocks"},
        ("transformer", "text_encoder", "text_encoder_2"),
        StableDiffusion3Pipeline,
        (
            "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight",
            "model.diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1.bias",
            "model.diffusion_model.joint_blocks.0.context_block.attn.ln_k.weight",
            "model.diffusion_model.x_embedder.proj.weight",
            "model.diffusion_model.pos_embed",
        ),
    ),
}
PARAMS = pytest.mark.parametrize("fam", list(FAMILIES.values()), ids=list(FAMILIES))
LORA_SCALE = 0.8
TE_WEIGHTS = {"text_encoder": 0.5, "text_encoder_2": 1.5}  # SD 3 'detail' on its CLIPs


def _base(fam: Fam, folder: Path | None = None) -> dict[str, dict[str, torch.Tensor]]:
    root = folder or builtin_base_path(fam.base)
    return {c: read_component_weights(root, c) for c in fam.components}


def _flow(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return str(value)


def _block_weight(fam: Fam, module: str) -> float:
    """This file's reading of the per-block spec: the module's group by diffusers prefix, its index."""
    spec = fam.blocks
    for group, prefix in fam.groups.items():
        found = re.match(rf"{prefix}\.(\d+)\.", module)
        if found is None or group not in spec:
            continue
        value = spec[group]
        if not isinstance(value, dict):
            return float(value)
        for key, weight in value.items():
            low, _, high = key.partition("-")
            if int(low) <= int(found[1]) <= int(high or low):
                return float(weight)
    return float(spec.get("default", 1.0))


def _mix_recipe(fam: Fam, outputs: str, fuse: str = f"{{lora_scale: {LORA_SCALE}}}") -> str:
    adapters = "".join(f"          {n}: builtin:{fam.base}/{n}\n" for n in fam.weights)
    detail: dict[str, Any] = {"transformer": fam.blocks}
    if "text_encoder" in fam.components:
        detail.update(TE_WEIGHTS)
    weights = {n: (detail if n == "detail" else w) for n, w in fam.weights.items()}
    return (
        f"""\
        base: builtin:{fam.base}
        adapters:
"""
        + adapters
        + f"""\
        set_adapters: {{adapters: {_flow(weights)}}}
        fuse: {fuse}
        outputs:
"""
        + textwrap.indent(textwrap.dedent(outputs), "          ")
    )


def _expected(fam: Fam, base: dict[str, dict[str, torch.Tensor]]) -> dict[tuple[str, str], torch.Tensor]:
    """s·Σ wᵢ(module)·ΔWᵢ per base weight, from the LoRA files (float64)."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    for name, weight in fam.weights.items():
        for (component, key), delta in lora_deltas(builtin_lora_path(f"{fam.base}/{name}"), base).items():
            if name == "detail":
                weight = (
                    _block_weight(fam, key.removesuffix(".weight"))
                    if component == "transformer"
                    else TE_WEIGHTS[component]
                )
            out[(component, key)] = (
                out.get((component, key), torch.zeros_like(delta)) + LORA_SCALE * weight * delta
            )
    return out


def _check_fused(
    folder: Path, base: dict[str, dict[str, torch.Tensor]], terms: dict[tuple[str, str], torch.Tensor]
) -> None:
    """fused == base + Σ terms where a term exists (float64 → atol 1e-5), bit-equal elsewhere."""
    for component in base:
        for key, tensor in read_component_weights(folder, component).items():
            original = base[component][key]
            if (component, key) in terms and terms[(component, key)].any():
                expected = original.double() + terms[(component, key)]
                torch.testing.assert_close(
                    tensor.double(), expected, atol=1e-5, rtol=0, msg=f"{component}.{key}"
                )
                assert not torch.equal(tensor, original), f"{component}.{key} unchanged"
            else:
                assert torch.equal(tensor, original), f"{component}.{key} changed"


# ---- fuse -------------------------------------------------------------------------------------


@PARAMS
def test_every_layout_and_block_weights_fuse_exactly_on_both_executors(fam: Fam, tmp_path: Path) -> None:
    reports = _both(tmp_path, _mix_recipe(fam, "fused: {kind: pipeline, path: fused}\n"))
    base = _base(fam)
    terms = _expected(fam, base)
    zero = {k for k, v in terms.items() if not v.any()}
    assert not zero  # every module of every layout is fused (no block weight of 0 here)
    blocks = {_block_weight(fam, k.removesuffix(".weight")) for c, k in terms if c == "transformer"}
    assert len(blocks) >= 3  # the per-block weights and the default all took effect
    _check_fused(tmp_path / "stream" / "fused", base, terms)
    assert reports["fused"].changed == len(terms) and reports["fused"].max_abs_diff_vs_fp32 == 0.0


def _spacing(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    big = magnitude.to(dtype)
    return (torch.nextafter(big, torch.full_like(big, float("inf"))) - big).double()


@PARAMS
def test_bfloat16_base_streams_within_half_an_ulp(fam: Fam, tmp_path: Path) -> None:
    """A bfloat16 base and bfloat16 LoRA files (as published): the stream rounds each fused weight once
    (≤ ½ ulp of the exact value); the pipeline route, which rounds each delta, within 2 ulps of it."""
    pipe = DiffusionPipeline.from_pretrained(str(builtin_base_path(fam.base)), dtype=torch.bfloat16)
    pipe.save_pretrained(tmp_path / "base")
    del pipe
    names = list(fam.weights)[:2]
    for name in names:
        source = builtin_lora_path(f"{fam.base}/{name}")
        tensors = {k: v if k.endswith(".alpha") else v.bfloat16() for k, v in load_file(str(source)).items()}
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=read_metadata(source))
    adapters = ", ".join(f"{n}: {{file: {n}.safetensors}}" for n in names)
    _both(
        tmp_path,
        f"""\
        base: {{path: base}}
        adapters: {{{adapters}}}
        set_adapters: {{adapters: {{{names[0]}: 0.9, {names[1]}: -0.7}}}}
        fuse: {{lora_scale: 0.8}}
        outputs: {{fused: {{kind: pipeline, path: fused}}}}
        """,
        identical=False,
    )
    base = _base(fam, tmp_path / "base")
    deltas = {n: lora_deltas(tmp_path / f"{n}.safetensors", base) for n in names}
    weights = {names[0]: 0.9 * 0.8, names[1]: -0.7 * 0.8}
    worst_stream = worst_pipe = 0.0
    for component in fam.components:
        ours = read_component_weights(tmp_path / "stream" / "fused", component)
        theirs = read_component_weights(tmp_path / "pipe" / "fused", component)
        for key, tensor in ours.items():
            w = base[component][key].double()
            parts = [weights[n] * deltas[n].get((component, key), torch.zeros_like(w)) for n in names]
            if not any(p.any() for p in parts):
                assert torch.equal(tensor, base[component][key]) and torch.equal(theirs[key], tensor)
                continue
            exact = w + sum(parts)
            x, y = tensor.double(), theirs[key].double()
            partial = [(w + p).abs() for p in parts]  # the pipeline route adds one delta at a time
            operands = torch.stack([w.abs(), *(p.abs() for p in parts), *partial, x.abs(), y.abs()]).amax(0)
            noise = 2**-20 * operands  # the stream sums in float32 before its one rounding
            error = ((x - exact).abs() - noise).clamp(min=0) / _spacing(x.abs(), torch.bfloat16)
            worst_stream = max(worst_stream, float(error.max()))
            worst_pipe = max(worst_pipe, float(((x - y).abs() / _spacing(operands, torch.bfloat16)).max()))
    assert worst_stream <= 0.5 + 1e-3
    assert worst_pipe <= 2.0


# ---- single file --------------------------------------------------------------------------------


@PARAMS
def test_single_file_round_trips_and_serves_as_a_base(fam: Fam, tmp_path: Path) -> None:
    fuse = f"{{lora_scale: {LORA_SCALE}, components: [transformer]}}"
    outputs = "fused: {kind: pipeline, path: fused}\nsingle: {kind: single_file, path: single.safetensors}\n"
    _both(tmp_path, _mix_recipe(fam, outputs, fuse))  # both executors write the same bytes
    single = load_file(str(tmp_path / "stream" / "single.safetensors"))
    fused = read_component_weights(tmp_path / "stream" / "fused", "transformer")
    assert set(fam.single_keys) <= set(single)
    assert sum(t.numel() for t in single.values()) == sum(t.numel() for t in fused.values())
    for component in fam.components[1:]:  # fuse.components: [transformer] leaves SD 3's CLIPs alone
        fused_te = read_component_weights(tmp_path / "stream" / "fused", component)
        assert all(torch.equal(v, _base(fam)[component][k]) for k, v in fused_te.items()), component
    model_class = type(fam.pipeline.from_pretrained(str(tmp_path / "stream" / "fused")).transformer)
    loaded = model_class.from_single_file(
        str(tmp_path / "stream" / "single.safetensors"),
        config=str(tmp_path / "stream" / "fused"),
        subfolder="transformer",
        local_files_only=True,
    ).state_dict()
    assert loaded.keys() == fused.keys() and all(torch.equal(loaded[k], fused[k]) for k in fused)
    # the single file as a base (configs from the fused folder): a second LoRA fuses onto exactly it
    shutil.copy(tmp_path / "stream" / "single.safetensors", tmp_path / "single.safetensors")
    second = tmp_path / "second"
    second.mkdir()
    shutil.copytree(tmp_path / "stream" / "fused", second / "config")
    shutil.copy(tmp_path / "single.safetensors", second / "single.safetensors")
    _both(
        second,
        f"""\
        base: {{file: single.safetensors, config: config, family: {fam.key}}}
        adapters: {{style: builtin:{fam.base}/style}}
        fuse: {{adapters: [style], lora_scale: 0.5, components: [transformer]}}
        outputs: {{again: {{kind: pipeline, path: again}}}}
        """,
    )
    terms = {
        k: 0.5 * v
        for k, v in lora_deltas(builtin_lora_path(f"{fam.base}/style"), {"transformer": fused}).items()
    }
    _check_fused(second / "stream" / "again", {"transformer": fused}, terms)


# ---- LoRA files ---------------------------------------------------------------------------------


def _injected(pipe: Any, adapter: str, components: tuple[str, ...]) -> dict[tuple[str, str], torch.Tensor]:
    out = {}
    for component in components:
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                out[(component, f"{name}.weight")] = module.scaling[adapter] * (b @ a).double()
    return out


@PARAMS
def test_lora_files_reload_with_every_module(fam: Fam, tmp_path: Path) -> None:
    """A cat merge of two layouts, and each adapter alone, written in the diffusers and kohya/ComfyUI
    layouts: every file holds the deltas it was written from and reloads with every module applied."""
    first, second = list(fam.weights)[:2]
    layouts = {n: [n, f"{n}-kohya"] for n in ("both", *fam.weights)}
    outputs = "".join(
        f"          {out}: {{kind: lora, adapter: {n}, path: {out}{', layout: kohya' if out.endswith('kohya') else ''}}}\n"
        for n, outs in layouts.items()
        for out in outs
    )
    adapters = "".join(f"          {n}: builtin:{fam.base}/{n}\n" for n in fam.weights)
    build_text(
        tmp_path,
        f"""\
        base: builtin:{fam.base}
        adapters:
{adapters}        merges:
          both: {{method: cat, adapters: {{{first}: 0.8, {second}: -0.5}}}}
        outputs:
{outputs}""",
    )
    base = _base(fam)
    deltas = {n: lora_deltas(builtin_lora_path(f"{fam.base}/{n}"), base) for n in fam.weights}
    expected = {
        "both": {
            k: 0.8 * deltas[first].get(k, 0) + (-0.5) * deltas[second].get(k, 0)  # type: ignore[operator]
            for k in {*deltas[first], *deltas[second]}
        },
        **deltas,
    }
    pipe = fam.pipeline.from_pretrained(str(builtin_base_path(fam.base)))
    kohya_keys: set[str] = set()
    for name, outs in layouts.items():
        for out in outs:
            path = next((tmp_path / "out" / out).glob("*.safetensors"))
            if out.endswith("kohya"):
                kohya_keys |= set(load_file(str(path)))
            in_file = lora_deltas(path, base)
            assert set(in_file) == set(expected[name]), out
            for key, delta in in_file.items():
                torch.testing.assert_close(
                    delta, expected[name][key], atol=1e-6, rtol=0, msg=f"{out} file {key}"
                )
            adapter = out.replace("-", "_")
            load_adapter(pipe, adapter, path, fam.key)  # refuses a module diffusers would skip
            loaded = _injected(pipe, adapter, fam.components)
            assert {k for k, v in loaded.items() if v.any()} <= set(expected[name]), out
            for key, delta in expected[name].items():
                torch.testing.assert_close(loaded[key], delta, atol=1e-6, rtol=0, msg=f"{out} reloaded {key}")
    comfy = {
        "qwen_image": "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight",
        "z_image": "lora_unet_layers_0_attention_qkv.lora_down.weight",  # fused q/k/v, as ComfyUI names it
        "sd3": "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight",
    }[fam.key]
    assert comfy in kohya_keys and all(k.startswith("lora_") for k in kohya_keys)


# ---- grids ----------------------------------------------------------------------------------------


@PARAMS
def test_grid_calls_the_family_as_it_is_called(
    fam: Fam, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    original = fam.pipeline.__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        # copies: Z-Image's pipeline rewrites the prompt lists it is given in place
        calls.append(
            {k: list(v) if isinstance(v, list) else v for k, v in kwargs.items() if k != "generator"}
        )
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fam.pipeline, "__call__", spy)
    grid = """\
        grid:
          kind: grid
          path: grid.png
          prompts: [a red fox in the snow]
          seeds: [0]
          steps: 2
          negative_prompt: blurry
          variants: [base, style, mix, fused]
          sweep: {lora_scale: [0.5]}
        """
    result = build_text(tmp_path, _mix_recipe(fam, grid))
    assert result.manifest is not None
    sidecar = json.loads((tmp_path / "out" / "grid.json").read_text())
    assert (tmp_path / "out" / "grid.png").stat().st_size > 0 and len(sidecar["cells"]) == 5
    assert sidecar["fused_vs_runtime_max_abs_diff"] < 1e-4
    assert len(calls) == 6  # 5 columns and the hidden runtime equivalent of 'fused'
    assert all(c["negative_prompt"] == ["blurry"] for c in calls)
    if fam.key == "qwen_image":  # classifier-free guidance is true_cfg_scale; LoRA scale in attention_kwargs
        assert all(c["true_cfg_scale"] == 4.0 and "guidance_scale" not in c for c in calls)
        scales = [c["attention_kwargs"]["scale"] for c in calls if "attention_kwargs" in c]
    else:
        guidance = {"z_image": 5.0, "sd3": 7.0}[fam.key]
        assert all(c["guidance_scale"] == guidance for c in calls)
        scales = [c["joint_attention_kwargs"]["scale"] for c in calls if "joint_attention_kwargs" in c]
    assert sorted(scales) == [0.5, LORA_SCALE]  # the sweep and the runtime equivalent of 'fused'


# ---- static checks ------------------------------------------------------------------------------


@PARAMS
def test_per_block_spec_errors_are_located(fam: Fam, tmp_path: Path) -> None:
    group = next(iter(fam.groups))
    text = f"""\
        base: builtin:{fam.base}
        adapters:
          style: builtin:{fam.base}/style
        set_adapters:
          adapters:
            style:
              transformer:
                {group}: {{0-1: 0.5, 2: 1.0}}
                double_blocks: 0.5
        outputs:
          grid: {{kind: grid, path: g.png, prompts: [a cat], variants: [mix]}}
        """
    label = {"qwen_image": "Qwen-Image", "z_image": "Z-Image", "sd3": "SD 3"}[fam.key]
    groups = ", ".join(fam.groups)
    hint = {"sd3": "did you mean 'joint_blocks'?"}.get(fam.key, f"groups: {groups}, or 'default'")
    assert messages(problems_of(tmp_path, text)) == [
        f"set_adapters.adapters.style.transformer.double_blocks: {label} has no block group 'double_blocks' [{hint}]"
    ]
    text = text.replace("                double_blocks: 0.5\n", "")
    assert messages(problems_of(tmp_path, text)) == [
        f"set_adapters.adapters.style.transformer.{group}.2: block 2 is out of range: the model has 2 {group} (0-1)"
    ]


LYCORIS_LAYOUTS = {
    "kohya": ("lokr-decomposed", "row"),
    "lycoris": ("loha", "column"),
    "diffusers": ("lora", "row"),
}


@PARAMS
@pytest.mark.parametrize("layout", list(LYCORIS_LAYOUTS))
def test_lycoris_and_dora_fuse_to_the_oracle_on_both_executors(fam: Fam, layout: str, tmp_path: Path) -> None:
    """LoKr/LoHa/DoRA files on the family's transformer, named as kohya, LyCORIS and PEFT name them:
    both executors write W + s·ΔW (W + s·(W' − W) with DoRA) as lycoris.functional computes ΔW."""
    pytest.importorskip("lycoris.functional")
    from tests.helpers.lycoris_files import (
        adapter_metadata,
        add_dora,
        expected_weight,
        make_module,
        state_dict,
    )
    from tests.test_lycoris_fuse import assert_fused, both_routes

    base = _base(fam)
    prefix = next(iter(fam.groups.values()))
    linears = [k for k, v in base["transformer"].items() if k.startswith(f"{prefix}.0.") and v.ndim == 2]
    linears = [k for k in linears if k.endswith(".weight") and min(base["transformer"][k].shape) >= 8][:3]
    algorithm, dora = LYCORIS_LAYOUTS[layout]
    modules = []
    for i, key in enumerate(linears):
        shape = tuple(base["transformer"][key].shape)
        module = make_module("transformer", key.removesuffix(".weight"), shape, algorithm, seed=700 + 10 * i)
        if i == 0:
            add_dora(module, dora, seed=705, peft=layout == "diffusers")
        modules.append(module)
    metadata = adapter_metadata(("transformer",), 2, 3.0) if layout == "diffusers" else {}
    save_file(state_dict(modules, layout), str(tmp_path / "lyco.safetensors"), metadata=metadata)
    text = f"""\
        base: builtin:{fam.base}
        adapters: {{lyco: {{file: lyco.safetensors}}}}
        set_adapters: {{adapters: {{lyco: 0.7}}}}
        fuse: {{lora_scale: {LORA_SCALE}}}
        outputs: {{fused: {{kind: pipeline, path: fused}}}}
        """
    fused = both_routes(tmp_path, textwrap.dedent(text), fam.components)
    expected = {
        ("transformer", f"{m.module}.weight"): expected_weight(
            base["transformer"][f"{m.module}.weight"], [(m, 0.7 * LORA_SCALE)]
        )
        for m in modules
    }
    assert len(expected) == 3
    assert_fused(base, fused, expected)


def test_a_sibling_family_lora_is_refused_naming_both(tmp_path: Path) -> None:
    """Z-Image and Qwen-Image LoRAs are told apart by their module names at any width."""
    text = """\
        base: builtin:{base}
        adapters: {{other: {{file: other.safetensors}}}}
        outputs: {{l: {{kind: lora, adapter: other, path: l}}}}
        """
    shutil.copy(builtin_lora_path("tiny-z-image/detail"), tmp_path / "other.safetensors")
    found = messages(problems_of(tmp_path, text.format(base="tiny-qwen-image")))
    assert len(found) == 1 and found[0].startswith("adapters.other: the LoRA is a Z-Image LoRA ('")
    assert "but the base is Qwen-Image (built-in tiny-qwen-image)" in found[0]
    shutil.copy(builtin_lora_path("tiny-qwen-image/detail"), tmp_path / "other.safetensors")
    for base, label in (("tiny-z-image", "Z-Image"), ("tiny-sd3", "SD 3")):
        found = messages(problems_of(tmp_path, text.format(base=base)))
        assert len(found) == 1 and found[0].startswith("adapters.other: the LoRA is a Qwen-Image LoRA ('")
        assert f"but the base is {label} (built-in {base})" in found[0]


def test_an_edit_pipeline_builds_but_renders_no_grid(tmp_path: Path) -> None:
    """A Qwen-Image-Edit folder is Qwen-Image for everything but grids, which need an input image."""
    shutil.copytree(builtin_base_path("tiny-qwen-image"), tmp_path / "edit")
    index = json.loads((tmp_path / "edit" / "model_index.json").read_text())
    index["_class_name"] = "QwenImageEditPlusPipeline"
    (tmp_path / "edit" / "model_index.json").write_text(json.dumps(index))
    text = """\
        base: {path: edit}
        adapters: {style: builtin:tiny-qwen-image/style}
        fuse: {adapters: [style], lora_scale: 1.0}
        outputs:
          fused: {kind: single_file, path: edit.safetensors}
          grid: {kind: grid, path: g.png, prompts: [a cat], variants: [base, fused]}
        """
    assert messages(problems_of(tmp_path, text)) == [
        "outputs.grid.kind: the base is a QwenImageEditPlusPipeline, which edits an input image: grids render "
        "from prompts only [build the fused pipeline and LoRA files here, and sample the edit model with "
        "its own images]"
    ]
    result = build_text(tmp_path, text.replace("          grid: {kind: grid", "          #grid: {kind: grid"))
    assert result.manifest is not None
    single = load_file(str(tmp_path / "out" / "edit.safetensors"))
    terms = lora_deltas(builtin_lora_path("tiny-qwen-image/style"), _base(FAMILIES["qwen_image"]))
    base = read_component_weights(builtin_base_path("tiny-qwen-image"), "transformer")
    for (_, key), delta in terms.items():
        torch.testing.assert_close(single[key].double(), base[key].double() + delta, atol=1e-5, rtol=0)


def test_an_edit_pipeline_known_only_when_loaded_renders_no_grid(tmp_path: Path) -> None:
    """A hub base's class is known once it is loaded: the grid refuses an edit pipeline then too."""
    from lorarecipe.errors import BuildError
    from lorarecipe.plan import RenderGrid
    from lorarecipe.runner.pipeline.grids import GridRenderer
    from tests.helpers.recipes import compile_text

    plan = compile_text(
        tmp_path,
        """\
        base: builtin:tiny-qwen-image
        adapters: {style: builtin:tiny-qwen-image/style}
        outputs: {grid: {kind: grid, path: g.png, prompts: [a cat], variants: [base, style]}}
        """,
    )
    renderer = GridRenderer(
        plan, plan.of_type(RenderGrid)[0], {"dtype": "float32", "device": "cpu", "digests": {}}
    )
    edit = type("QwenImageEditPlusPipeline", (), {})()
    with pytest.raises(
        BuildError, match="the base is a QwenImageEditPlusPipeline, which edits an input image"
    ):
        renderer.attach(edit)
