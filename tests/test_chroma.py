"""Chroma on the built-in tiny-chroma (FLUX.1's transformer pruned of its modulation, T5 alone).

- fuse: a Chroma LoRA written here (PEFT keys on every kind of Chroma Linear, the
  ``distilled_guidance_layer`` included) and FLUX.1 LoRAs that fit Chroma (kohya BFL names with fused
  qkv/linear1 — tiny-flux/detail without its modulation, final adaLN and CLIP modules —, ai-toolkit,
  XLabs), one negative weight, per-block weights and ``lora_scale``: the fused folder equals
  W + s·Σ wᵢ(module)·ΔWᵢ read from the files by ``tests.helpers.lora_math`` (float64), each module's
  block weight recomputed by ``tests.test_flux_fuse``'s own parsing, nothing else changed; the
  streaming executor is bit-identical to the pipeline route;
- single file: Chroma's original layout (BFL blocks without modulation, ``distilled_guidance_layer``
  with ``in_layer``/``out_layer`` and ``norms.N.scale``), each tensor checked against the fused folder
  through this file's own inverse of diffusers' ``convert_chroma_transformer_checkpoint_to_diffusers``;
  detected as Chroma and streamed back as a base, bit for bit;
- static checks: a FLUX.1 LoRA on modules Chroma lacks (modulation, the CLIP text encoder) is refused
  naming both families and the modules, a Chroma LoRA on FLUX.1 likewise;
- grids: Chroma's classifier-free guidance (``guidance_scale`` 5.0, the negative prompt passed) and
  ``joint_attention_kwargs``; an img2img base renders none.
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
from diffusers import ChromaPipeline
from safetensors.torch import load_file, save_file

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from tests.helpers.lora_math import lora_deltas, read_component_weights
from tests.helpers.recipes import build_text, messages, problems_of
from tests.test_flux_fuse import _block_weight
from tests.test_flux_outputs import _from_bfl
from tests.test_streaming import _both

# FLUX.1 modules Chroma has not (kohya names): per-block modulation, the final adaLN, embedders, CLIP
_NOT_IN_CHROMA = re.compile(r"_mod_lin|modulation|time_in|vector_in|guidance_in|^lora_te")
# this file's reading of Chroma's guidance MLP in the original layout -> diffusers names
_GUIDANCE = {"in_layer": "linear_1", "out_layer": "linear_2"}
CHROMA_MODULES = (
    "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.layers.1.linear_2",
    "distilled_guidance_layer.out_proj",
    "x_embedder",
    "context_embedder",
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.1.ff_context.net.2",
    "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.1.proj_out",
    "proj_out",
)
BLOCKS = {"double_blocks": {"0": 0.5, "1": -0.3}, "single_blocks": {"1": 2.0}, "default": 0.25}
WEIGHTS = {"chroma": 0.7, "detail": None, "aitk": -0.6, "xlabs": 1.3}  # None: BLOCKS
LORA_SCALE = 0.8


def _base() -> dict[str, dict[str, torch.Tensor]]:
    return {c: read_component_weights(builtin_base_path("tiny-chroma"), c) for c in ("transformer",)}


def _chroma_lora(path: Path) -> None:
    """A rank-4 PEFT LoRA (alpha = rank) on CHROMA_MODULES, shapes from tiny-chroma."""
    base, generator, tensors = _base()["transformer"], torch.Generator().manual_seed(11), {}
    for module in CHROMA_MODULES:
        out_features, in_features = base[f"{module}.weight"].shape
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(4, in_features, generator=generator)
        tensors[f"transformer.{module}.lora_B.weight"] = 0.1 * torch.randn(
            out_features, 4, generator=generator
        )
    save_file(tensors, str(path))


def _files(folder: Path) -> None:
    """The adapters of RECIPE in ``folder``: the Chroma LoRA and FLUX.1 LoRAs that fit Chroma."""
    _chroma_lora(folder / "chroma.safetensors")
    detail = load_file(str(builtin_lora_path("tiny-flux/detail")))
    kept = {k: v for k, v in detail.items() if not _NOT_IN_CHROMA.search(k.split(".")[0])}
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kept and len(kept) < len(detail)
    save_file(kept, str(folder / "detail.safetensors"))
    for name in ("aitk", "xlabs"):
        shutil.copy(builtin_lora_path(f"tiny-flux/{name}"), folder / f"{name}.safetensors")


RECIPE = """\
    base: builtin:tiny-chroma
    adapters:
      chroma: {file: chroma.safetensors}
      detail: {file: detail.safetensors}
      aitk: {file: aitk.safetensors}
      xlabs: {file: xlabs.safetensors}
    set_adapters:
      adapters:
        chroma: 0.7
        detail: {transformer: {double_blocks: {0: 0.5, 1: -0.3}, single_blocks: {1: 2.0}, default: 0.25}}
        aitk: -0.6
        xlabs: 1.3
    fuse: {lora_scale: 0.8}
    outputs:
      fused: {kind: pipeline, path: fused}
      single: {kind: single_file, path: chroma.safetensors}
    """


def _from_chroma(key: str, fused: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor a key of Chroma's original layout must hold, from the diffusers transformer's."""
    if m := re.fullmatch(
        r"distilled_guidance_layer\.layers\.(\d+)\.(in_layer|out_layer)\.(weight|bias)", key
    ):
        return fused[f"distilled_guidance_layer.layers.{m[1]}.{_GUIDANCE[m[2]]}.{m[3]}"]
    if m := re.fullmatch(r"distilled_guidance_layer\.norms\.(\d+)\.scale", key):
        return fused[f"distilled_guidance_layer.norms.{m[1]}.weight"]
    if key.startswith("distilled_guidance_layer."):
        return fused[key]
    return _from_bfl(key, fused)


def test_chroma_and_fitting_flux1_loras_fuse_on_both_executors(tmp_path: Path) -> None:
    _files(tmp_path)
    base = _base()
    reports = _both(tmp_path, RECIPE)  # bit-identical between the executors (folder and single file)
    expected: dict[str, torch.Tensor] = {}
    for name, weight in WEIGHTS.items():
        for (_, key), delta in lora_deltas(tmp_path / f"{name}.safetensors", base).items():
            block = _block_weight(BLOCKS, key.removesuffix(".weight")) if weight is None else weight
            expected[key] = expected.get(key, torch.zeros_like(delta)) + LORA_SCALE * block * delta
    assert {f"{m}.weight" for m in CHROMA_MODULES} <= set(expected)
    assert "transformer_blocks.0.attn.to_k.weight" in expected  # a fused qkv of the kohya file
    fused = read_component_weights(tmp_path / "stream" / "fused", "transformer")
    assert fused.keys() == base["transformer"].keys()
    for key, tensor in fused.items():
        original = base["transformer"][key]
        if key in expected:
            torch.testing.assert_close(tensor.double(), original.double() + expected[key], atol=1e-5, rtol=0)
        else:
            assert torch.equal(tensor, original), key
    text_encoder = builtin_base_path("tiny-chroma") / "text_encoder"
    assert read_component_weights(tmp_path / "stream" / "fused", "text_encoder") == {} or all(
        torch.equal(t, read_component_weights(text_encoder.parent, "text_encoder")[k])
        for k, t in read_component_weights(tmp_path / "stream" / "fused", "text_encoder").items()
    )
    assert reports["fused"].changed == len(expected)

    single = load_file(str(tmp_path / "stream" / "chroma.safetensors"))
    assert "distilled_guidance_layer.layers.0.in_layer.weight" in single
    assert "distilled_guidance_layer.norms.1.scale" in single and "img_in.weight" in single
    assert not any(re.search(r"_mod\.|modulation|time_in|vector_in|guidance_in", k) for k in single)
    assert sum(t.numel() for t in single.values()) == sum(t.numel() for t in fused.values())
    for key, tensor in single.items():
        assert torch.equal(tensor, _from_chroma(key, fused)), key


def test_a_chroma_single_file_is_detected_and_streams_back_as_a_base(tmp_path: Path) -> None:
    _files(tmp_path)
    first = build_text(tmp_path, textwrap.dedent(RECIPE))
    assert first.manifest is not None
    shutil.copytree(builtin_base_path("tiny-chroma"), tmp_path / "config")
    again = build_text(
        tmp_path,
        """\
        base: {file: out/chroma.safetensors, config: config}
        adapters: {chroma: {file: chroma.safetensors}}
        fuse: {adapters: [chroma], lora_scale: 0.0}
        outputs: {again: {kind: pipeline, path: again}}
        """,
        out="out2",
        name="again.yaml",
    )
    assert again.manifest is not None
    read = read_component_weights(tmp_path / "out2" / "again", "transformer")
    fused = read_component_weights(tmp_path / "out" / "fused", "transformer")
    assert read.keys() == fused.keys() and all(torch.equal(read[k], fused[k]) for k in fused)


def test_loras_that_do_not_fit_are_refused_naming_both(tmp_path: Path) -> None:
    text = """\
        base: builtin:{base}
        adapters: {{other: {{file: other.safetensors}}}}
        outputs: {{l: {{kind: lora, adapter: other, path: l}}}}
        """
    shutil.copy(builtin_lora_path("tiny-flux/detail"), tmp_path / "other.safetensors")
    assert messages(problems_of(tmp_path, text.format(base="tiny-chroma"))) == [
        "adapters.other: the LoRA is a FLUX.1 LoRA ('double_blocks_0_img_mlp_0' 32→128 (FLUX.1 MLP ratio)) "
        "but the base is Chroma (built-in tiny-chroma), which lacks 19 of its modules: "
        "double_blocks_0_img_mod_lin; double_blocks_0_txt_mod_lin; double_blocks_1_img_mod_lin"
    ]
    shutil.copy(builtin_lora_path("tiny-flux/style"), tmp_path / "other.safetensors")
    found = messages(problems_of(tmp_path, text.format(base="tiny-chroma")))
    assert len(found) == 1 and found[0].startswith("adapters.other: 8 of 43 LoRA modules do not fit the base")
    assert (
        "text_encoder.encoder.layers.0.self_attn.k_proj (Chroma loads LoRAs only into transformer)"
        in found[0]
    )
    _chroma_lora(tmp_path / "other.safetensors")
    found = messages(problems_of(tmp_path, text.format(base="tiny-flux")))
    assert found == [
        "adapters.other: the LoRA is a Chroma LoRA ('distilled_guidance_layer.in_proj' (Chroma's distilled "
        "guidance layer)) but the base is FLUX.1 (built-in tiny-flux)"
    ]


def test_grid_calls_chroma_with_classifier_free_guidance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _files(tmp_path)
    calls: list[dict[str, Any]] = []
    original = ChromaPipeline.__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append({k: v for k, v in kwargs.items() if k != "generator"})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ChromaPipeline, "__call__", spy)
    result = build_text(
        tmp_path,
        """\
        base: builtin:tiny-chroma
        adapters: {chroma: {file: chroma.safetensors}}
        set_adapters: {adapters: {chroma: 0.9}}
        outputs:
          grid:
            kind: grid
            path: grid.png
            prompts: [a red fox in the snow]
            seeds: [0]
            steps: 2
            negative_prompt: blurry
            variants: [base, chroma, mix]
            sweep: {lora_scale: [0.5]}
        """,
    )
    assert result.manifest is not None and (tmp_path / "out" / "grid.png").stat().st_size > 0
    assert len(calls) == 4  # base, chroma, mix and the mix at lora_scale 0.5
    assert all(c["guidance_scale"] == 5.0 and c["negative_prompt"] == ["blurry"] for c in calls)
    assert [c["joint_attention_kwargs"]["scale"] for c in calls if "joint_attention_kwargs" in c] == [0.5]


def test_an_img2img_base_renders_no_grid(tmp_path: Path) -> None:
    shutil.copytree(builtin_base_path("tiny-chroma"), tmp_path / "i2i")
    index = json.loads((tmp_path / "i2i" / "model_index.json").read_text())
    index["_class_name"] = "ChromaImg2ImgPipeline"
    (tmp_path / "i2i" / "model_index.json").write_text(json.dumps(index))
    _chroma_lora(tmp_path / "chroma.safetensors")
    text = """\
        base: {path: i2i}
        adapters: {chroma: {file: chroma.safetensors}}
        outputs: {grid: {kind: grid, path: g.png, prompts: [a cat], variants: [base, chroma]}}
        """
    assert messages(problems_of(tmp_path, text)) == [
        "outputs.grid.kind: the base is a ChromaImg2ImgPipeline, which edits an input image: grids render "
        "from prompts only [build the fused pipeline and LoRA files here, and sample the edit model with "
        "its own images]"
    ]
