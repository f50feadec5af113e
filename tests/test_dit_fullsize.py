"""Qwen-Image, Z-Image and SD 3/3.5 at full size: names, layouts and block counts of the real models.

Weightless (meta-device) transformers built from the released configs, and LoRA files with the key
lists of real LoRAs (InvokeAI's transcriptions in ``../shared/realdata/loras/manifests``, random values):

- single files: every diffusers key of Qwen-Image (60 blocks), Z-Image (30 layers + refiners), SD 3.5
  Large (38 blocks, q/k norms) and SD 3.5 Medium (24 blocks, second attention) has exactly one place in
  the original layout, and diffusers' own ``from_single_file`` converters read the layout back to the
  same keys and shapes (meta tensors: shapes only);
- LoRA names: a real Qwen-Image LoRA (bare diffusers names with kohya suffixes and alphas) passes the
  header-only checks against the full-size transformer with every module placed, and diffusers converts
  it onto existing modules with the same deltas as the independent reading; a real Qwen-Image LoKr is
  refused with the reason (diffusers raises on it); a real FLUX.1 LoRA on Qwen-Image is refused naming
  both families; Z-Image's original names (fused ``qkv``) convert as diffusers converts them, and the
  ``x_embedder``/``final_layer`` diffusers drops are placed;
- per-block weights are checked against the real block counts (60, 30 + 2 + 2, 24, 38).
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from lorarecipe.families import FAMILIES
from lorarecipe.inspect import BaseInfo, ComponentInfo, check_lora_against_base, inspect_lora, read_header
from lorarecipe.outputs.singlefile import single_file_layout
from lorarecipe.runner.lora_conversion import convert_original_lora, is_original_layout
from tests.helpers.lora_math import lora_deltas
from tests.helpers.recipes import messages, problems_of

MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "loras" / "manifests"

# the released transformer configs (diffusers' defaults are Qwen-Image's and Z-Image's)
SD35_LARGE = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}
SD35_MEDIUM = {
    **SD35_LARGE,
    "num_layers": 24,
    "num_attention_heads": 24,
    "caption_projection_dim": 1536,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
}


def _meta(name: str) -> torch.nn.Module:
    import diffusers

    with torch.device("meta"):
        if name == "qwen_image":
            return diffusers.QwenImageTransformer2DModel()
        if name == "z_image":
            return diffusers.ZImageTransformer2DModel()
        return diffusers.SD3Transformer2DModel(**(SD35_LARGE if name == "sd35_large" else SD35_MEDIUM))


@pytest.fixture(scope="module")
def shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    return {
        name: {k: tuple(v.shape) for k, v in _meta(name).state_dict().items()}
        for name in ("qwen_image", "z_image", "sd35_large", "sd35_medium")
    }


def _reader(family: str) -> Any:
    from diffusers.loaders import single_file_utils as sfu

    return {
        "qwen_image": lambda checkpoint: checkpoint,  # SINGLE_FILE_LOADABLE_CLASSES: the identity
        "z_image": sfu.convert_z_image_transformer_checkpoint_to_diffusers,
        "sd3": sfu.convert_sd3_transformer_checkpoint_to_diffusers,
    }[family]


@pytest.mark.parametrize(
    ("model", "family", "expected"),
    [
        ("qwen_image", "qwen_image", "transformer_blocks.59.img_mod.1.weight"),
        ("z_image", "z_image", "layers.29.attention.qkv.weight"),
        (
            "sd35_large",
            "sd3",
            "model.diffusion_model.joint_blocks.37.context_block.adaLN_modulation.1.weight",
        ),
        ("sd35_medium", "sd3", "model.diffusion_model.joint_blocks.12.x_block.attn2.qkv.weight"),
    ],
)
def test_single_file_names_are_diffusers_reader_inverse(
    shapes: dict[str, dict[str, tuple[int, ...]]], model: str, family: str, expected: str
) -> None:
    full = shapes[model]
    layout = single_file_layout(family, {"transformer": full}, {})
    placed = [(p.component, p.key) for t in layout for p in t.sources]
    assert sorted(placed) == sorted(("transformer", k) for k in full)  # each key exactly once
    assert expected in {t.key for t in layout}
    checkpoint: dict[str, Any] = {t.key: torch.empty(t.shape, device="meta") for t in layout}
    converted = _reader(family)(dict(checkpoint))
    assert {k: tuple(v.shape) for k, v in converted.items()} == full


def _base_info(family: str, shapes: dict[str, tuple[int, ...]]) -> BaseInfo:
    tensors = {k: ("BF16", s) for k, s in shapes.items()}
    return BaseInfo(
        kind="diffusers_folder",
        family=family,
        family_evidence=f"model_index.json names {FAMILIES[family].pipeline_class}",
        pipeline_class=FAMILIES[family].pipeline_class,
        dtype="bfloat16",
        components={"transformer": ComponentInfo("transformer", None, (), tensors)},
        total_bytes=2 * sum(math.prod(s) for s in shapes.values()),
        largest_tensor_bytes=0,
    )


def _manifest_file(name: str, folder: Path, alpha: float = 16.0, keep: int | None = None) -> Path:
    path = MANIFESTS / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key, entry in list(json.loads(path.read_text())["tensors"].items())[:keep]:
        shape = entry["shape"]
        tensors[key] = (
            torch.tensor(alpha) if key.endswith(".alpha") else torch.randn(shape, generator=generator) * 0.01
        )
    out = folder / f"{name}.safetensors"
    save_file(tensors, str(out))
    return out


@pytest.mark.realdata
def test_a_real_qwen_image_lora_fits_the_full_size_transformer(
    shapes: dict[str, dict[str, tuple[int, ...]]], tmp_path: Path
) -> None:
    from diffusers import QwenImagePipeline

    path = _manifest_file("invokeai_qwen_image_lora_diffusers_format", tmp_path)
    header = read_header(path)
    # bare diffusers names with kohya suffixes and alphas: read by Qwen-Image's loader, by no other
    assert inspect_lora(header).unsupported is not None
    info = inspect_lora(header, "qwen_image")
    assert info.unsupported is None and info.ranks == (64,) and info.alpha_source == "keys"
    report = check_lora_against_base(info, _base_info("qwen_image", shapes["qwen_image"]))
    assert report.checked and report.matched == report.total == 3 and not report.missing
    converted = QwenImagePipeline.lora_state_dict(str(path))
    modules = {k.rsplit(".", 1)[0] for k in shapes["qwen_image"]}
    stems = {k.removeprefix("transformer.").rsplit(".", 2)[0] for k in converted}
    assert stems <= modules and len(stems) == 3
    theirs = {
        ("transformer", f"{s}.weight"): (
            converted[f"transformer.{s}.lora_B.weight"].double()
            @ converted[f"transformer.{s}.lora_A.weight"].double()
        )
        for s in stems
    }
    base = {"transformer": {k: torch.empty(v, device="meta") for k, v in shapes["qwen_image"].items()}}
    ours = lora_deltas(path, base)
    assert ours.keys() == theirs.keys()
    for key, delta in ours.items():
        torch.testing.assert_close(theirs[key], delta, atol=1e-9, rtol=1e-6)


@pytest.mark.realdata
def test_a_real_qwen_image_lokr_is_refused_with_the_reason(tmp_path: Path) -> None:
    from diffusers import QwenImagePipeline

    path = _manifest_file("invokeai_qwen_image_lora_kohya_format", tmp_path)
    info = inspect_lora(read_header(path), "qwen_image")
    assert info.unsupported is not None and info.unsupported.startswith("LyCORIS LoKr (Kronecker) weights")
    with pytest.raises(ValueError, match="should be empty"):  # what diffusers 0.42 does with it
        QwenImagePipeline.lora_state_dict(str(path))


@pytest.mark.realdata
def test_a_real_flux1_lora_on_qwen_image_names_both(
    shapes: dict[str, dict[str, tuple[int, ...]]], tmp_path: Path
) -> None:
    path = _manifest_file("invokeai_flux_lora_kohya_format", tmp_path, keep=60)
    info = inspect_lora(read_header(path), "qwen_image")
    report = check_lora_against_base(info, _base_info("qwen_image", shapes["qwen_image"]))
    assert report.family_conflict is not None
    assert report.family_conflict.startswith("the LoRA is a FLUX.1 LoRA ('")
    assert report.family_conflict.endswith(
        "but the base is Qwen-Image (model_index.json names QwenImagePipeline)"
    )


def test_z_image_original_names_convert_as_diffusers_converts_them(
    shapes: dict[str, dict[str, tuple[int, ...]]],
) -> None:
    """Z-Image's original names (ComfyUI's kohya layout, fused qkv): lorarecipe's conversion gives the
    deltas diffusers' gives for the layers and refiners, and places the embedder and final layer that
    diffusers' converter leaves on modules the model does not have."""
    from diffusers import ZImagePipeline

    z_image = FAMILIES["z_image"]
    modules = {k.rsplit(".", 1)[0] for k in shapes["z_image"]}
    generator = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    stems = {
        "layers_0_attention_qkv": (3840, 3 * 3840),
        "noise_refiner_1_attention_out": (3840, 3840),
        "layers_29_feed_forward_w2": (10240, 3840),
        "context_refiner_0_attention_qkv": (3840, 3 * 3840),
        "x_embedder": (64, 3840),
        "final_layer_adaLN_modulation_1": (256, 3840),
    }
    for stem, (inp, out) in stems.items():
        state[f"lora_unet_{stem}.lora_down.weight"] = torch.randn(4, inp, generator=generator) * 0.1
        state[f"lora_unet_{stem}.lora_up.weight"] = torch.randn(out, 4, generator=generator) * 0.1
        state[f"lora_unet_{stem}.alpha"] = torch.tensor(2.0)
    assert is_original_layout(z_image, state)
    ours = convert_original_lora(z_image, dict(state), {"transformer": list(modules)}, "z.safetensors")
    theirs = ZImagePipeline.lora_state_dict({k: v.clone() for k, v in state.items()})

    def deltas(factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each module's ΔW applied to 2 fixed random vectors (B @ (A @ x): cheap at full width)."""
        out = {}
        for key, down in factors.items():
            if key.endswith(".lora_A.weight"):
                probe = torch.randn(
                    down.shape[1], 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64
                )
                up = factors[key.replace("lora_A", "lora_B")].double()
                out[key.removeprefix("transformer.").removesuffix(".lora_A.weight")] = up @ (
                    down.double() @ probe
                )
        return out

    mine, diffusers_ = deltas(ours), deltas(theirs)
    assert set(mine) <= set(modules)  # every module placed, 11 from 6 original ones
    assert (
        len(mine) == 10 and "all_final_layer.2-1.adaLN_modulation.1" in mine and "all_x_embedder.2-1" in mine
    )
    assert sorted(set(diffusers_) - set(modules)) == ["final.layer.adaLN_modulation.1", "x.embedder"]
    for module in set(diffusers_) & set(modules):
        torch.testing.assert_close(mine[module], diffusers_[module], atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize(
    ("family", "model", "spec", "expected"),
    [
        (
            "qwen_image",
            "qwen_image",
            "{transformer_blocks: {0-59: 1.0, 60: 0.5}}",
            ["transformer_blocks.60: block 60 is out of range: the model has 60 transformer_blocks (0-59)"],
        ),
        (
            "z_image",
            "z_image",
            "{layers: {0-29: 1.0, 30: 0.5}, noise_refiner: {0-1: 0.2}, context_refiner: {2: 0.0}}",
            [
                "layers.30: block 30 is out of range: the model has 30 layers (0-29)",
                "context_refiner.2: block 2 is out of range: the model has 2 context_refiner (0-1)",
            ],
        ),
        (
            "sd3",
            "sd35_large",
            "{joint_blocks: {0-37: 1.0, 38: 0.5}}",
            ["joint_blocks.38: block 38 is out of range: the model has 38 joint_blocks (0-37)"],
        ),
        (
            "sd3",
            "sd35_medium",
            "{joint_blocks: {20-24: 1.0}}",
            ["joint_blocks.20-24: block 24 is out of range: the model has 24 joint_blocks (0-23)"],
        ),
    ],
)
def test_block_weights_are_checked_against_the_real_block_counts(
    shapes: dict[str, dict[str, tuple[int, ...]]],
    family: str,
    model: str,
    spec: str,
    expected: list[str],
    tmp_path: Path,
) -> None:
    """A base folder with the released model's tensor names (each a 1×1 stand-in: counts come from names)."""
    folder = tmp_path / "base"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": FAMILIES[family].pipeline_class, "transformer": ["diffusers", "X"]})
    )
    (folder / "transformer" / "config.json").write_text("{}")
    names = {k for k, s in shapes[model].items() if k.endswith(".weight") and len(s) == 2}
    save_file(
        {k: torch.zeros(1, 1) for k in names},
        str(folder / "transformer" / "diffusion_pytorch_model.safetensors"),
    )
    module = next(k for k in sorted(names) if "to_q" in k).removesuffix(".weight")
    save_file(
        {
            f"transformer.{module}.lora_A.weight": torch.ones(1, 1),
            f"transformer.{module}.lora_B.weight": torch.ones(1, 1),
        },
        str(tmp_path / "a.safetensors"),
    )
    text = f"""\
        base: {{path: base}}
        adapters: {{a: {{file: a.safetensors}}}}
        set_adapters: {{adapters: {{a: {{transformer: {spec}}}}}}}
        outputs: {{l: {{kind: lora, adapter: a, path: l}}}}
        """
    found = messages(problems_of(tmp_path, textwrap.dedent(text)))
    assert found == [f"set_adapters.adapters.a.transformer.{e}" for e in expected]
