"""Adapter loading never loads a file as nothing: conversions, refusals, coverage, NaN."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.errors import BuildError, UnsafeInputError
from lorarecipe.runner.pipeline.adapters import load_adapter
from tests.helpers.lora_math import expected_fused, read_component_weights
from tests.helpers.recipes import build_text

_PEFT_UNET_ATTN = re.compile(r"^unet\.(.+)\.(to_q|to_k|to_v|to_out\.0)\.lora_(A|B)\.weight$")


def _pipe() -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(builtin_base_path("tiny-sd")))


def _attn_procs_file(path: Path) -> Path:
    """The built-in PEFT LoRA rewritten in the old attention-processor layout (UNet attention only)."""
    out = {}
    for key, tensor in load_file(str(builtin_lora_path("tiny-sd/style"))).items():
        m = _PEFT_UNET_ATTN.match(key)
        if m:
            proj = "to_out" if m[2] == "to_out.0" else m[2]
            out[f"{m[1]}.processor.{proj}_lora.{'down' if m[3] == 'A' else 'up'}.weight"] = tensor
    save_file(out, str(path))
    return path


def test_attention_processor_layout_is_converted_not_silently_dropped(tmp_path: Path) -> None:
    lora = _attn_procs_file(tmp_path / "procs.safetensors")
    text = f"""\
base: builtin:tiny-sd
adapters:
  procs: {{file: {lora.name}}}
fuse: {{adapters: [procs], lora_scale: 1.0}}
outputs:
  fused: {{kind: pipeline, path: fused}}
"""
    build_text(tmp_path, text)
    base = {"unet": read_component_weights(builtin_base_path("tiny-sd"), "unet")}
    expected = expected_fused(base, [(lora, 1.0)], 1.0)
    fused = read_component_weights(tmp_path / "out" / "fused", "unet")
    assert len(expected) == 32
    for (_, key), value in expected.items():
        assert (fused[key].double() - value).abs().max().item() <= 1e-6


def test_nan_tensor_is_refused_naming_it(tmp_path: Path) -> None:
    tensors = load_file(str(builtin_lora_path("tiny-sd/style")))
    name = sorted(tensors)[3]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    with pytest.raises(UnsafeInputError, match=re.escape(name)):
        load_adapter(_pipe(), "nan", tmp_path / "nan.safetensors")


def test_modules_diffusers_would_drop_are_an_error(tmp_path: Path) -> None:
    tensors = load_file(str(builtin_lora_path("tiny-sd/detail")))
    # an SDXL-only module: diffusers 0.42 loads the rest and silently skips this one
    tensors["lora_unet_add_embedding_linear_1.lora_down.weight"] = torch.zeros(8, 8)
    tensors["lora_unet_add_embedding_linear_1.lora_up.weight"] = torch.zeros(8, 8)
    tensors["lora_unet_add_embedding_linear_1.alpha"] = torch.tensor(8.0)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with pytest.raises(BuildError) as err:
        load_adapter(_pipe(), "extra", tmp_path / "extra.safetensors")
    assert "1 of 61 LoRA modules were not applied" in str(err.value)
    assert "unet.add_embedding_linear_1" in str(err.value)


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("cloneofsimo_lora/lora_disney.safetensors", "cloneofsimo"),
        ("lycoris_lokr/smart_falcon_4_lokr.safetensors", "LoKr"),
        ("timohavdk_sd_lora/new.safetensors", "lora_unet_unet_"),
    ],
)
def test_unsupported_real_files_end_in_clear_errors(realdata: Path, name: str, needle: str) -> None:
    with pytest.raises(UnsafeInputError, match=needle):
        load_adapter(_pipe(), "x", realdata / "loras" / name)
