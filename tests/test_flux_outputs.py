"""FLUX.1 outputs: the BFL single file, merged LoRA files in both layouts, sample grids.

- single file: the transformer only, in Black Forest Labs' names (as ``flux1-dev.safetensors``),
  written identically by both executors; each tensor is checked against the fused diffusers folder
  through this file's own inverse of diffusers' reader (fused qkv/linear1 rows, swapped final
  adaLN); read back as a base by the streaming executor it gives the same weights; and (slow, full
  width) diffusers' ``FluxTransformer2DModel.from_single_file`` loads it bit for bit.
- LoRA files: merges and loaded adapters written in the diffusers layout and in the kohya/ComfyUI
  layout (fused qkv, block-diagonal) load back into a fresh pipeline with every module applied and
  the deltas of the adapter they were written from.
- grids: every variant kind, called as FLUX.1 is called (distilled guidance, no negative prompt
  unless true CFG, ``joint_attention_kwargs`` for lora_scale).
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.runner.pipeline.adapters import load_adapter
from tests.helpers.lora_math import lora_deltas, read_component_weights
from tests.helpers.recipes import build_text, messages, problems_of
from tests.test_streaming import _both

# this file's own reading of the BFL layout: original module -> (diffusers modules, how rows split)
_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.norm.query_norm": ["attn.norm_q"],
    "img_attn.norm.key_norm": ["attn.norm_k"],
    "txt_attn.norm.query_norm": ["attn.norm_added_q"],
    "txt_attn.norm.key_norm": ["attn.norm_added_k"],
}
_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
    "norm.query_norm": ["attn.norm_q"],
    "norm.key_norm": ["attn.norm_k"],
}
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def _from_bfl(key: str, diffusers: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor a BFL key must hold, assembled from the diffusers transformer's tensors."""
    body, _, param = key.rpartition(".")
    param = "weight" if param == "scale" else param
    if m := re.fullmatch(r"double_blocks\.(\d+)\.(.+)", body):
        parts = [f"transformer_blocks.{m[1]}.{p}.{param}" for p in _DOUBLE[m[2]]]
    elif m := re.fullmatch(r"single_blocks\.(\d+)\.(.+)", body):
        parts = [f"single_transformer_blocks.{m[1]}.{p}.{param}" for p in _SINGLE[m[2]]]
    else:
        parts = [f"{_TOP[body]}.{param}"]
    joined = torch.cat([diffusers[p] for p in parts])
    if body == "final_layer.adaLN_modulation.1":  # diffusers scale|shift, BFL shift|scale
        half = joined.shape[0] // 2
        joined = torch.cat([joined[half:], joined[:half]])
    return joined


SINGLE_RECIPE = """\
    base: builtin:tiny-flux
    adapters:
      style: builtin:tiny-flux/style
      detail: builtin:tiny-flux/detail
    set_adapters: {adapters: {style: 0.6, detail: {transformer: {single_blocks: 2.0, default: 0.5}}}}
    fuse: {lora_scale: 0.9, components: [transformer]}
    outputs:
      fused: {kind: pipeline, path: fused}
      single: {kind: single_file, path: flux1.safetensors}
      half: {kind: single_file, path: flux1-bf16.safetensors, dtype: bfloat16}
    """


def test_single_file_is_the_bfl_transformer(tmp_path: Path) -> None:
    _both(tmp_path, SINGLE_RECIPE)  # bit-identical between the executors, float32 and bfloat16
    fused = read_component_weights(tmp_path / "stream" / "fused", "transformer")
    single = load_file(str(tmp_path / "stream" / "flux1.safetensors"))
    assert len(single) == 84 and not any(k.startswith(("transformer_blocks", "text_", "vae")) for k in single)
    assert sum(t.numel() for t in single.values()) == sum(t.numel() for t in fused.values())
    for key, tensor in single.items():
        assert torch.equal(tensor, _from_bfl(key, fused)), key
    half = load_file(str(tmp_path / "stream" / "flux1-bf16.safetensors"))
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], single[k].bfloat16()) for k in single)


def test_single_file_parts_in_row_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bfloat16 single file with every tensor through the row-chunk path (real FLUX.1 tensors are
    above the chunk size): each part of a fused qkv/linear1 is written at its rows' offset. Chunks of
    two rows are not GEMM row blocks, so the deltas may round differently: within one bfloat16 ulp of
    the pipeline route (a misplaced part would be off by whole weights)."""
    from lorarecipe.runner.streaming import tensors as streaming_tensors
    from lorarecipe.runner.streaming import writer as streaming_write

    monkeypatch.setattr(streaming_tensors, "_CHUNK_ELEMENTS", 64)
    chunked: list[str] = []
    original = streaming_write.write_chunked

    def spy(*args: Any) -> bool:
        done = original(*args)
        if done:
            chunked.append(args[2].key)
        return done

    monkeypatch.setattr(streaming_write, "write_chunked", spy)
    text = SINGLE_RECIPE.replace("      fused: {kind: pipeline, path: fused}\n", "").replace(
        "      single: {kind: single_file, path: flux1.safetensors}\n", ""
    )
    _both(tmp_path, text, identical=False)
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight"} <= set(chunked)
    ours = load_file(str(tmp_path / "stream" / "flux1-bf16.safetensors"))
    theirs = load_file(str(tmp_path / "pipe" / "flux1-bf16.safetensors"))
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        ulp = (torch.nextafter(tensor.abs(), torch.full_like(tensor, float("inf"))) - tensor.abs()).double()
        assert bool(((tensor.double() - theirs[key].double()).abs() <= ulp).all()), key


def test_a_bfl_single_file_streams_back_as_a_base(tmp_path: Path) -> None:
    """The single file as a base (its config from the built-in folder): fusing a LoRA at scale 0 gives
    the transformer it was written from, bit for bit (every row read back into its diffusers place)."""
    first = build_text(tmp_path, SINGLE_RECIPE.replace("      half: ", "      #half: "))
    assert first.manifest is not None
    shutil.copytree(builtin_base_path("tiny-flux"), tmp_path / "config")
    result = build_text(
        tmp_path,
        """\
        base: {file: out/flux1.safetensors, config: config}
        adapters: {style: builtin:tiny-flux/style}
        fuse: {adapters: [style], lora_scale: 0.0, components: [transformer]}
        outputs: {again: {kind: pipeline, path: again}}
        """,
        out="out2",
        name="again.yaml",
    )
    assert result.manifest is not None
    again = read_component_weights(tmp_path / "out2" / "again", "transformer")
    fused = read_component_weights(tmp_path / "out" / "fused", "transformer")
    assert again.keys() == fused.keys() and all(torch.equal(again[k], fused[k]) for k in fused)


def test_a_fused_text_encoder_cannot_go_into_the_single_file(tmp_path: Path) -> None:
    text = SINGLE_RECIPE.replace(", components: [transformer]", "")
    assert messages(problems_of(tmp_path, textwrap.dedent(text))) == [
        "outputs.single.kind: a FLUX.1 single file holds the transformer only (as the original checkpoint "
        "does), but the fuse also changes text_encoder [set fuse.components: [transformer], or write the "
        "fused text_encoder with kind: pipeline]",
        "outputs.half.kind: a FLUX.1 single file holds the transformer only (as the original checkpoint "
        "does), but the fuse also changes text_encoder [set fuse.components: [transformer], or write the "
        "fused text_encoder with kind: pipeline]",
    ]


@pytest.mark.slow
def test_from_single_file_loads_the_export_at_full_width(tmp_path: Path) -> None:
    """diffusers' reader hard-codes FLUX.1's width (3072) and MLP ratio: a full-width transformer with
    one double and one single block (530 M parameters, bfloat16), a kohya LoRA with fused qkv and
    linear1, streamed into a folder and a BFL single file; ``from_single_file`` gives back the
    folder's transformer bit for bit."""
    from diffusers import FluxTransformer2DModel

    from lorarecipe.builtin.flux_loras import make_flux_lora

    base = tmp_path / "base"
    shutil.copytree(builtin_base_path("tiny-flux"), base)
    shutil.rmtree(base / "transformer")
    with torch.device("meta"):
        model = FluxTransformer2DModel(
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            joint_attention_dim=32,  # tiny-flux's T5 and CLIP widths
            pooled_projection_dim=32,
            guidance_embeds=True,
        )
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.to(torch.bfloat16).save_pretrained(base / "transformer")
    pipe = FluxPipeline.from_pretrained(str(base), transformer=model)  # names and shapes for the LoRA
    make_flux_lora(
        pipe, tmp_path / "wide.safetensors", layout="kohya", rank=4, alpha=2.0, seed=3, text_encoders=False
    )
    del pipe, model
    result = build_text(
        tmp_path,
        """\
        base: {path: base}
        adapters: {wide: {file: wide.safetensors}}
        fuse: {adapters: [wide], lora_scale: 0.7}
        outputs:
          fused: {kind: pipeline, path: fused}
          single: {kind: single_file, path: flux1.safetensors}
        """,
    )
    assert result.manifest is not None
    loaded = FluxTransformer2DModel.from_single_file(
        str(tmp_path / "out" / "flux1.safetensors"),
        config=str(base),
        subfolder="transformer",
        torch_dtype=torch.bfloat16,
        local_files_only=True,
    ).state_dict()
    fused = read_component_weights(tmp_path / "out" / "fused", "transformer")
    assert loaded.keys() == fused.keys()
    assert all(torch.equal(loaded[k], fused[k]) for k in fused)
    original = read_component_weights(base, "transformer")
    changed = {k for k in fused if not torch.equal(fused[k], original[k])}
    assert {"transformer_blocks.0.attn.to_k.weight", "single_transformer_blocks.0.proj_mlp.weight"} <= changed


# ---- LoRA files --------------------------------------------------------------------------------


def _injected(pipe: Any, adapter: str) -> dict[tuple[str, str], torch.Tensor]:
    out = {}
    for component in ("transformer", "text_encoder"):
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                out[(component, f"{name}.weight")] = module.scaling[adapter] * (b @ a).double()
    return out


def test_lora_files_reload_with_every_module(tmp_path: Path) -> None:
    build_text(
        tmp_path,
        """\
        base: builtin:tiny-flux
        adapters:
          style: builtin:tiny-flux/style
          detail: builtin:tiny-flux/detail
          aitk: builtin:tiny-flux/aitk
        merges:
          both: {method: cat, adapters: {style: 0.8, aitk: -0.5}}
          svd: {method: ties_svd, adapters: {style: 1.0, detail: 0.7}, density: 0.6, svd_rank: 6}
        outputs:
          both: {kind: lora, adapter: both, path: both}
          both-kohya: {kind: lora, adapter: both, path: both-kohya, layout: kohya}
          svd-kohya: {kind: lora, adapter: svd, path: svd-kohya, layout: kohya}
          detail-kohya: {kind: lora, adapter: detail, path: detail-kohya, layout: kohya}
          style-kohya: {kind: lora, adapter: style, path: style-kohya, layout: kohya}
        """,
    )
    out = tmp_path / "out"
    base = {
        c: read_component_weights(builtin_base_path("tiny-flux"), c) for c in ("transformer", "text_encoder")
    }
    files = {
        "both": out / "both" / "pytorch_lora_weights.safetensors",
        "both-kohya": out / "both-kohya" / "both.safetensors",
        "svd-kohya": out / "svd-kohya" / "svd.safetensors",
        "detail-kohya": out / "detail-kohya" / "detail.safetensors",
        "style-kohya": out / "style-kohya" / "style.safetensors",
    }
    # the kohya files use BFL names with fused qkv/linear1, as ComfyUI reads them
    keys = set(load_file(str(files["both-kohya"])))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in keys and not any("to_q" in k for k in keys)
    same_as = {
        "both-kohya": lora_deltas(files["both"], base),  # the merge, read from its diffusers file
        "detail-kohya": lora_deltas(builtin_lora_path("tiny-flux/detail"), base),
        "style-kohya": lora_deltas(builtin_lora_path("tiny-flux/style"), base),
    }
    pipe = DiffusionPipeline.from_pretrained(builtin_base_path("tiny-flux"))
    for name, path in files.items():
        expected = same_as.get(name) or lora_deltas(path, base)
        assert set(lora_deltas(path, base)) == set(expected), name  # the file itself holds every module
        for key, delta in lora_deltas(path, base).items():
            torch.testing.assert_close(delta, expected[key], atol=1e-6, rtol=0, msg=f"{name} file {key}")
        load_adapter(pipe, name.replace("-", "_"), path, "flux")  # refuses a module diffusers would skip
        loaded = _injected(pipe, name.replace("-", "_"))
        extra = {k for k in loaded if k not in expected}
        assert all(not loaded[k].any() for k in extra), (name, extra)  # only zero blocks of fused parts
        for key, delta in expected.items():
            torch.testing.assert_close(loaded[key], delta, atol=1e-6, rtol=0, msg=f"{name} reloaded {key}")


# ---- grids -------------------------------------------------------------------------------------


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every FluxPipeline call (the call itself still runs)."""
    seen: list[dict[str, Any]] = []
    original = FluxPipeline.__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append({k: v for k, v in kwargs.items() if k != "generator"})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FluxPipeline, "__call__", spy)
    return seen


GRID = """\
    base: builtin:tiny-flux
    adapters:
      style: {builtin: tiny-flux/style, trigger_words: [pixel art]}
      detail: builtin:tiny-flux/detail
    merges:
      both: {method: cat, adapters: [style, detail]}
    set_adapters:
      adapters: {style: 0.7, detail: {transformer: {double_blocks: {0: 0.5}, default: 1.0}}}
    fuse: {lora_scale: 0.8}
    outputs:
      grid:
        kind: grid
        path: grid.png
        prompts: [a photo of a cat]
        seeds: [0, 1]
        steps: 2
        variants: [base, style, both, mix, fused]
        sweep: {SWEEP}
    """


def test_grid_calls_flux_as_flux(tmp_path: Path, calls: list[dict[str, Any]]) -> None:
    result = build_text(tmp_path, GRID.replace("{SWEEP}", "{lora_scale: [0.5, 1.5]}"))
    assert result.manifest is not None
    sidecar = json.loads((tmp_path / "out" / "grid.json").read_text())
    assert sidecar["columns"] == [
        "base (LoRA off)",
        "style",
        "both",
        "mix: style 0.7, detail transformer(double_blocks 0 0.5, default 1)",
        "fused (lora_scale 0.8)",
        "lora_scale = 0.5",
        "lora_scale = 1.5",
    ]
    assert sidecar["guidance"] == 3.5 and sidecar["fused_vs_runtime_max_abs_diff"] < 1e-4
    assert len(calls) == 8  # 7 columns and the hidden runtime equivalent of 'fused', 2 seeds per call
    assert all("negative_prompt" not in c and c["guidance_scale"] == 3.5 for c in calls)
    scales = [c["joint_attention_kwargs"]["scale"] for c in calls if "joint_attention_kwargs" in c]
    assert sorted(scales) == [0.5, 0.8, 1.5]  # the sweep and the runtime equivalent of 'fused'
    assert calls[1]["prompt"] == ["pixel art, a photo of a cat"] * 2
    images = {c["file"]: c for c in sidecar["cells"]}
    assert len(images) == 14


def test_grid_weight_sweep_and_true_cfg(tmp_path: Path, calls: list[dict[str, Any]]) -> None:
    text = GRID.replace("{SWEEP}", "{adapter: style, weights: [0.0, 1.0]}")
    text = text.replace("        steps: 2\n", "        steps: 2\n        negative_prompt: blurry\n")
    found = messages(problems_of(tmp_path, textwrap.dedent(text)))
    assert found == [
        "outputs.grid.negative_prompt: FLUX.1 is guidance-distilled: it has no negative prompt without "
        "true CFG [add true_cfg_scale (> 1, e.g. 4.0: two passes per step), or remove negative_prompt]"
    ]
    text = text.replace(
        "        negative_prompt: blurry\n", "        negative_prompt: blurry\n        true_cfg_scale: 4.0\n"
    )
    assert build_text(tmp_path, text).manifest is not None
    assert all(c["negative_prompt"] == ["blurry"] * 2 and c["true_cfg_scale"] == 4.0 for c in calls)
    assert [c.get("joint_attention_kwargs") for c in calls].count(None) == 7
