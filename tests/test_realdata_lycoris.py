"""The real kohya LoKr files (smart_falcon 4/8/16: 350 modules each, old layout with the larger Kronecker
factor first) fused into a full-size SD1.5 UNet and CLIP-L text encoder built from config.

The three files are fused together (weights 0.6, 0.3, -0.2, lora_scale 0.9) by the streaming executor
into a float16 base; every one of the 350 modules' weights must equal W + s·Σ wᵢ·ΔWᵢ with ΔWᵢ from
``lycoris.functional.lokr.diff_weight`` on the file's tensors (float32; the output is float16, so
within half an ulp of it plus the oracle's own rounding), every other weight untouched. The modules
are matched by this test's own reading of kohya names (``lora_unet_`` + the diffusers path with dots
as underscores, ``lora_te_text_model_`` + the CLIP path). Skipped when ../shared/realdata is absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lorarecipe.builtin.materialize import builtin_base_path
from tests.helpers.recipes import build_text

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

FILES = {"falcon4": 0.6, "falcon8": 0.3, "falcon16": -0.2}
SCALE = 0.9


@pytest.fixture(scope="module")
def full_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd's VAE, scheduler and tokenizer + a full-size SD1.5 UNet and CLIP-L (float16, seed 0)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("sd15-lokr") / "base"
    shutil.copytree(builtin_base_path("tiny-sd"), folder)
    for component in ("unet", "text_encoder"):
        shutil.rmtree(folder / component)
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=64, cross_attention_dim=768).half().save_pretrained(folder / "unet")
    config = CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12
    )
    CLIPTextModel(config).half().save_pretrained(folder / "text_encoder")
    return folder


def _kohya_modules(keys: list[str]) -> dict[str, str]:
    """This test's own reading of the kohya names: weight key -> stem, for the UNet and CLIP keys."""
    out = {}
    for key in keys:
        module = key.removesuffix(".weight")
        out[key] = "lora_unet_" + module.replace(".", "_")
        out[f"te:{key}"] = "lora_te_text_model_" + module.replace(".", "_")
    return out


def test_real_lokr_files_fuse_every_module_into_full_size_sd15(full_base: Path, realdata: Path) -> None:
    lokr = pytest.importorskip("lycoris.functional.lokr")
    work = full_base.parent
    adapters = "\n".join(
        f"  {name}: {{file: {realdata}/loras/lycoris_lokr/smart_falcon_{name[6:]}_lokr.safetensors}}"
        for name in FILES
    )
    text = f"""\
base: {{path: base}}
adapters:
{adapters}
set_adapters:
  adapters: {json.dumps(FILES)}
fuse:
  lora_scale: {SCALE}
outputs:
  fused: {{kind: pipeline, path: fused}}
"""
    build_text(work, text, out="out", allow_read=(realdata,), executor="streaming")
    fuse = json.loads((work / "out" / "manifest.json").read_text())["checks"]["fuse"]["fused"]
    assert fuse["expected"] == 350 and fuse["changed"] >= 340  # a few deltas round away in float16
    handles = {
        name: safe_open(
            str(realdata / "loras" / "lycoris_lokr" / f"smart_falcon_{name[6:]}_lokr.safetensors"), "pt"
        )
        for name in FILES
    }
    file_keys = {name: list(handle.keys()) for name, handle in handles.items()}
    stems = {k.rsplit(".", 1)[0] for keys in file_keys.values() for k in keys}
    assert len(stems) == 350
    applied = 0
    for component, prefix in (("unet", ""), ("text_encoder", "te:")):
        path = f"{component}/" + (
            "diffusion_pytorch_model.safetensors" if component == "unet" else "model.safetensors"
        )
        base, fused = (
            safe_open(str(full_base / path), "pt"),
            safe_open(str(work / "out" / "fused" / path), "pt"),
        )
        keys = list(base.keys())
        names = _kohya_modules(keys)
        for key in keys:
            stem = names[prefix + key]
            weight, got = base.get_tensor(key), fused.get_tensor(key)
            if stem not in stems:
                assert torch.equal(weight, got), key
                continue
            total = torch.zeros(weight.shape, dtype=torch.float64)
            for name, w in FILES.items():
                t = {
                    k.rsplit(".", 1)[1]: handles[name].get_tensor(k).float()
                    for k in file_keys[name]
                    if k.rsplit(".", 1)[0] == stem
                }
                delta = lokr.diff_weight(
                    None, t["lokr_w1_a"], t["lokr_w1_b"], None, t["lokr_w2_a"], t["lokr_w2_b"], None,
                    gamma=float(t["alpha"]),
                )  # fmt: skip
                total += w * delta.double().reshape(weight.shape)
            expected = weight.double() + SCALE * total
            ulp = torch.finfo(torch.float16).eps * expected.abs().clamp(min=2**-14)
            assert bool(((got.double() - expected).abs() <= 0.5 * ulp + 1e-6).all()), key
            applied += 1
    assert applied == 350
