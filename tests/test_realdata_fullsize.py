"""Real third-party SD1.x LoRAs fused into a full-size SD1.5-architecture UNet (random weights).

Three real files — two in the diffusers ``unet.…lora.down/up`` layout and one in the old
attention-processor layout that diffusers 0.42 would load as nothing — fused with weights and a
lora_scale; every fused weight must equal W + s·Σ wᵢ·(αᵢ/rᵢ)·BᵢAᵢ computed from the files (fp32,
≤ 1e-6) and every other weight must be untouched. Skipped when ../shared/realdata is absent.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lorarecipe.builtin.materialize import builtin_base_path
from tests.helpers.lora_math import lora_deltas
from tests.helpers.recipes import build_text

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

LORAS = {
    "timohavdk": ("timohavdk_sd_lora/pytorch_lora_weights.safetensors", 0.7),
    "flower": ("hirvita6_flower/pytorch_lora_weights.safetensors", 0.3),
    "pokemon": ("catundchat_sd15_lora/pytorch_lora_weights.safetensors", 0.5),  # attention-processor layout
}
SCALE = 0.9


class LazyWeights(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-on-demand mapping (the full UNet is 3.4 GB)."""

    def __init__(self, path: Path) -> None:
        self._handle = safe_open(str(path), "pt")
        self._keys = list(self._handle.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@pytest.fixture(scope="module")
def full_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd's VAE/text encoder/tokenizer + a full-size SD1.5 UNet (859.5M params, fp32, seed 0)."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("sd15") / "base"
    shutil.copytree(builtin_base_path("tiny-sd"), folder)
    shutil.rmtree(folder / "unet")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    unet.save_pretrained(folder / "unet")
    del unet
    return folder


def test_real_loras_fuse_exactly_into_a_full_size_unet(full_base: Path, realdata: Path) -> None:
    work = full_base.parent
    adapters = "\n".join(
        f"  {name}: {{file: {realdata / 'loras' / rel}}}" for name, (rel, _) in LORAS.items()
    )
    weights = ", ".join(f"{name}: {w}" for name, (_, w) in LORAS.items())
    text = f"""\
base: {{path: base}}
adapters:
{adapters}
set_adapters:
  adapters: {{{weights}}}
fuse:
  lora_scale: {SCALE}
outputs:
  fused: {{kind: pipeline, path: fused}}
"""
    build_text(work, text, allow_read=(realdata,))
    base = LazyWeights(full_base / "unet" / "diffusion_pytorch_model.safetensors")
    fused = LazyWeights(work / "out" / "fused" / "unet" / "diffusion_pytorch_model.safetensors")
    expected: dict[str, torch.Tensor] = {}
    for rel, weight in LORAS.values():
        for (_, key), delta in lora_deltas(realdata / "loras" / rel, {"unet": base}).items():
            expected[key] = expected.get(key, torch.zeros_like(delta)) + weight * delta
    assert len(expected) == 128  # attention q/k/v/out of every transformer block
    worst = 0.0
    for key in base:
        if key in expected:
            target = base[key].double() + SCALE * expected[key]
            worst = max(worst, (fused[key].double() - target).abs().max().item())
        else:
            assert torch.equal(fused[key], base[key]), key
    assert worst <= 1e-6, worst
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    assert manifest["outputs"]["fused"]["executor"] == "streaming"  # the default route for fuse + save
    assert manifest["checks"]["fuse"]["fused"]["changed"] == 128
