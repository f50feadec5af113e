"""lorarecipe.inspect.base_model and .compat: base checkpoints from headers, and LoRA-vs-base checks.

Bases are tiny pipelines that diffusers itself builds and saves (so folder layout, variants, shards
and key names are the real ones); tensors are cross-checked with safetensors' own loader.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from lorarecipe.errors import InputUnavailableError, UnsafeInputError
from lorarecipe.inspect import (
    BaseInfo,
    ComponentInfo,
    SafetensorsHeader,
    TensorInfo,
    check_lora_against_base,
    inspect_diffusers_folder,
    inspect_lora,
    inspect_single_file,
    read_header,
)

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "loras"


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Tiny SD and SDXL folders saved by diffusers, plus the SD pipeline itself for LoRA building."""
    import torch

    from lorarecipe.builtin.materialize import build_base_pipeline

    root = tmp_path_factory.mktemp("bases")
    sd = build_base_pipeline("tiny-sd")  # the built-in tiny models: one set of configs for all tests
    sd.save_pretrained(root / "sd")
    sd.to(torch.float16).save_pretrained(root / "sd", variant="fp16")
    sd.to(torch.float32)
    xl = build_base_pipeline("tiny-sdxl")
    xl.save_pretrained(root / "sdxl")
    yield {"root": root, "sd": root / "sd", "sdxl": root / "sdxl", "pipe": sd}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tiny_sd_folder(bases: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    info = inspect_diffusers_folder(bases["sd"])
    assert (info.kind, info.pipeline_class, info.family, info.dtype) == (
        "diffusers_folder",
        "StableDiffusionPipeline",
        None,
        "float32",
    )
    assert "cross_attention_dim 32" in info.family_evidence
    assert sorted(info.components) == ["text_encoder", "unet", "vae"]
    assert info.components["unet"].files == ("unet/diffusion_pytorch_model.safetensors",)
    assert info.components["text_encoder"].class_name == "CLIPTextModel"
    total = 0
    for name, component in info.components.items():
        loaded = {k: v for f in component.files for k, v in load_file(str(bases["sd"] / f)).items()}
        assert {k: tuple(v.shape) for k, v in loaded.items()} == {
            k: s for k, (_, s) in component.tensors.items()
        }
        total += sum(v.numel() * v.element_size() for v in loaded.values())
        assert name in ("unet", "vae", "text_encoder")
    assert info.total_bytes == total
    assert info.largest_tensor_bytes == max(
        read_header(bases["sd"] / f).largest_tensor_bytes for c in info.components.values() for f in c.files
    )


def test_variant_files(bases: dict[str, Any]) -> None:
    info = inspect_diffusers_folder(bases["sd"], variant="fp16")
    assert info.dtype == "float16"
    assert info.components["unet"].files == ("unet/diffusion_pytorch_model.fp16.safetensors",)
    only_fp16 = _copy(bases["sd"], bases["root"] / "only-fp16")
    (only_fp16 / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InputUnavailableError, match="set the variant"):
        inspect_diffusers_folder(only_fp16)
    with pytest.raises(InputUnavailableError, match="variant 'bf16' not found"):
        inspect_diffusers_folder(only_fp16, variant="bf16")


def test_sharded_component_reads_every_shard(bases: dict[str, Any]) -> None:
    sharded = _copy(bases["sd"], bases["root"] / "sharded")
    shutil.rmtree(sharded / "unet")
    bases["pipe"].unet.save_pretrained(sharded / "unet", max_shard_size="100KB")
    index = json.loads((sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    info = inspect_diffusers_folder(sharded)
    assert info.components["unet"].files == tuple(f"unet/{s}" for s in shards)
    plain = inspect_diffusers_folder(bases["sd"])
    assert dict(info.components["unet"].tensors) == dict(plain.components["unet"].tensors)
    assert info.total_bytes == plain.total_bytes
    index["weight_map"]["x"] = "../../evil.safetensors"
    (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeInputError, match=r"not a \.safetensors file in the same folder"):
        inspect_diffusers_folder(sharded)


def test_pickle_only_component_is_refused(bases: dict[str, Any]) -> None:
    pickled = _copy(bases["sd"], bases["root"] / "pickled")
    shutil.rmtree(pickled / "unet")
    bases["pipe"].unet.save_pretrained(pickled / "unet", safe_serialization=False)
    assert (pickled / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(UnsafeInputError, match=r"only pickle weights .*never loads pickle files"):
        inspect_diffusers_folder(pickled)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(InputUnavailableError, match="no such folder"):
        inspect_diffusers_folder(tmp_path / "nope")
    with pytest.raises(
        InputUnavailableError, match=r"is not a diffusers pipeline folder \(no model_index.json\)"
    ):
        inspect_diffusers_folder(tmp_path)
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(UnsafeInputError, match="not a JSON object"):
        inspect_diffusers_folder(tmp_path)
    (tmp_path / "model_index.json").write_text("{oops")
    with pytest.raises(UnsafeInputError, match="not valid JSON"):
        inspect_diffusers_folder(tmp_path)


def test_family_from_pipeline_class_and_unet_config(bases: dict[str, Any], tmp_path: Path) -> None:
    xl = inspect_diffusers_folder(bases["sdxl"])
    assert (xl.family, xl.pipeline_class) == ("sdxl", "StableDiffusionXLPipeline")
    assert sorted(xl.components) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    for width, family in ((768, "sd1"), (1024, "sd2"), (2048, None)):
        folder = _copy(bases["sd"], tmp_path / str(width))
        config = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": width}))
        info = inspect_diffusers_folder(folder)
        assert info.family == family
        assert f"cross_attention_dim {width}" in info.family_evidence


def _write(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path))
    return path


SINGLE_FILES: dict[str, tuple[dict[str, tuple[int, ...]], str, list[str]]] = {
    "sd1": (
        {
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
            "first_stage_model.decoder.conv_in.weight": (4, 4, 3, 3),
        },
        "unet",
        ["text_encoder", "unet", "vae"],
    ),
    "sd2": (
        {
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (8, 4),
        },
        "unet",
        ["text_encoder", "unet"],
    ),
    "sdxl": (
        {
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (8, 8),
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (8, 4),
        },
        "unet",
        ["text_encoder", "text_encoder_2", "unet"],
    ),
    "flux": (
        {"double_blocks.0.img_attn.qkv.weight": (9216, 8), "single_blocks.0.linear1.weight": (8, 8)},
        "transformer",
        ["transformer"],
    ),
    "sd3": (
        {
            "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (8, 8),
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": (8, 8),
        },
        "transformer",
        ["text_encoder_3", "transformer"],
    ),
}


@pytest.mark.parametrize("family", sorted(SINGLE_FILES))
def test_single_files(tmp_path: Path, family: str) -> None:
    shapes, denoiser, components = SINGLE_FILES[family]
    info = inspect_single_file(_write(tmp_path / "model.safetensors", shapes))
    assert (info.kind, info.family, sorted(info.components), info.dtype) == (
        "single_file",
        family,
        components,
        "float16",
    )
    assert info.pipeline_class is not None
    assert info.total_bytes == sum(2 * math.prod(s) for s in shapes.values())
    keys = list(info.components[denoiser].tensors)
    assert not any(k.startswith("model.diffusion_model.") for k in keys)  # prefixes are stripped


def test_single_file_refuses_pickle(tmp_path: Path) -> None:
    with pytest.raises(UnsafeInputError, match="pickle"):
        inspect_single_file(tmp_path / "model.ckpt")


# ---- compat ----


def header_from_manifest(path: Path) -> SafetensorsHeader:
    """A key->shape manifest of a real LoRA -> the header such a file would have."""
    tensors, offset = {}, 0
    for key, entry in json.loads(path.read_text())["tensors"].items():
        size = 2 * math.prod(entry["shape"])
        tensors[key] = TensorInfo(key, "F16", tuple(entry["shape"]), offset, offset + size)
        offset += size
    return SafetensorsHeader(str(path), offset + 8, 0, MappingProxyType(tensors), MappingProxyType({}))


def _lora_header(state: dict[str, Any], metadata: dict[str, str] | None = None) -> SafetensorsHeader:
    tensors, offset = {}, 0
    for key, value in state.items():
        size = value.numel() * value.element_size()
        tensors[key] = TensorInfo(key, "F32", tuple(value.shape), offset, offset + size)
        offset += size
    return SafetensorsHeader(
        "<lora>", offset + 8, 0, MappingProxyType(tensors), MappingProxyType(metadata or {})
    )


@pytest.fixture(scope="module")
def tiny_lora(bases: dict[str, Any]) -> dict[str, Any]:
    """A PEFT LoRA on the tiny SD base's UNet (incl. conv proj_in) and text encoder, diffusers key names."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet, te = copy.deepcopy(bases["pipe"].unet), copy.deepcopy(bases["pipe"].text_encoder)
    unet.add_adapter(
        LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]), "x"
    )
    te.add_adapter(LoraConfig(r=2, target_modules=["q_proj", "fc1"]), "x")
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name="x").items()}
    state.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(te, adapter_name="x").items()})
    return state


def _kohya(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        out[
            prefix
            + module.replace(".", "_")
            + {"A.weight": ".lora_down.weight", "B.weight": ".lora_up.weight"}[part]
        ] = value
    return out


def test_peft_and_kohya_loras_match_their_own_base(bases: dict[str, Any], tiny_lora: dict[str, Any]) -> None:
    base = inspect_diffusers_folder(bases["sd"])
    wild = {k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in tiny_lora.items()}
    for state in (tiny_lora, wild, _kohya(tiny_lora)):
        lora = inspect_lora(_lora_header(state))
        report = check_lora_against_base(lora, base)
        assert report.checked and report.family_conflict is None
        assert (report.matched, report.total, report.missing, report.shape_mismatches) == (
            len(lora.modules),
            len(lora.modules),
            (),
            (),
        )
        assert {m.kernel for m in lora.modules} == {(), (1, 1), (3, 3)}


def test_lycoris_conv_factors_match_the_base(bases: dict[str, Any]) -> None:
    import copy

    from peft import LoHaConfig, LoKrConfig
    from peft.utils import get_peft_model_state_dict

    base = inspect_diffusers_folder(bases["sd"])
    for config in (
        LoHaConfig(r=4, target_modules=["to_q", "conv1"]),
        LoKrConfig(r=4, target_modules=["conv1"]),
    ):
        unet = copy.deepcopy(bases["pipe"].unet)
        unet.add_adapter(config, "x")
        state = get_peft_model_state_dict(unet, adapter_name="x")
        lora = inspect_lora(_lora_header({f"unet.{k}": v for k, v in state.items()}))
        report = check_lora_against_base(lora, base)
        assert report.matched == report.total == len(lora.modules) > 0, report


def test_real_sd15_lora_on_the_tiny_base_reports_shapes(bases: dict[str, Any]) -> None:
    if not REALDATA.is_dir():
        pytest.skip(f"real third-party files not available at {REALDATA}")
    lora = inspect_lora(read_header(REALDATA / "timohavdk_sd_lora/pytorch_lora_weights.safetensors"))
    report = check_lora_against_base(lora, inspect_diffusers_folder(bases["sd"]))
    assert report.checked and report.total == 128 and report.matched == 0
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k: LoRA 768→320, base 32→32" in (
        report.shape_mismatches
    )
    assert (
        report.missing[0] == "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_k"
    )  # 1 layer per block
    assert len(report.missing) == 20 and len(report.shape_mismatches) == 20  # lists are capped


def test_sgm_named_kohya_on_a_diffusers_folder_is_unchecked(bases: dict[str, Any]) -> None:
    manifest = REALDATA / "manifests/invokeai_probe_alien_style_sdxl_kohya.json"
    if not manifest.is_file():
        pytest.skip(f"{manifest} not available")
    header = header_from_manifest(manifest)
    base = inspect_diffusers_folder(bases["sdxl"])
    full = check_lora_against_base(inspect_lora(header), base)
    assert full.unchecked_components == ("unet",) and full.family_conflict is None
    unet_only = SafetensorsHeader(
        header.path,
        header.file_size,
        0,
        MappingProxyType({k: v for k, v in header.tensors.items() if k.startswith("lora_unet_")}),
        header.metadata,
    )
    report = check_lora_against_base(inspect_lora(unet_only), base)
    assert (report.checked, report.total, report.unchecked_components) == (False, 0, ("unet",))


def _fake_base(
    family: str, evidence: str, components: dict[str, dict[str, tuple[str, tuple[int, ...]]]]
) -> BaseInfo:
    return BaseInfo(
        "single_file",
        family,
        evidence,
        None,
        "float16",
        {n: ComponentInfo(n, None, (), t) for n, t in components.items()},
        0,
        0,
    )


def test_family_conflict_and_missing_component() -> None:
    if not REALDATA.is_dir():
        pytest.skip(f"real third-party files not available at {REALDATA}")
    sd2 = inspect_lora(read_header(REALDATA / "justinjiang_lora2/pytorch_lora_weights.safetensors"))
    base = _fake_base("sdxl", "model_index.json names StableDiffusionXLPipeline (SDXL)", {"vae": {}})
    report = check_lora_against_base(sd2, base)
    assert report.family_conflict == (
        "the LoRA is an SD 2.x LoRA (attn2.to_k input width 1024 (SD 2.x text encoder)) but the base is SDXL "
        "(model_index.json names StableDiffusionXLPipeline (SDXL))"
    )
    assert report.checked and report.total == 128 and report.matched == 0
    assert report.missing[0].endswith("(the base has no unet)")


def test_kohya_flux_maps_onto_a_bfl_single_file(tmp_path: Path) -> None:
    manifest = REALDATA / "manifests/invokeai_flux_lora_kohya_format.json"
    if not manifest.is_file():
        pytest.skip(f"{manifest} not available")
    lora = inspect_lora(header_from_manifest(manifest))
    qkv = next(m for m in lora.modules if m.name == "double_blocks_0_img_attn_qkv")
    base = _fake_base(
        "flux",
        "BFL",
        {
            "transformer": {
                "double_blocks.0.img_attn.qkv.weight": ("BF16", (9216, 3072)),
                "double_blocks.0.img_attn.proj.weight": ("BF16", (3072, 1)),
            }
        },
    )
    report = check_lora_against_base(lora, base)
    assert report.checked and report.matched == 1 and report.family_conflict is None
    assert report.shape_mismatches == ("double_blocks_0_img_attn_proj: LoRA 3072→3072, base 1→3072",)
    assert (qkv.in_features, qkv.out_features) == (3072, 9216)


# ---- real LoRAs against full-size architectures built on the meta device (shapes only, no memory) ----


@pytest.fixture(scope="module")
def skeletons() -> dict[str, BaseInfo]:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def component(name: str, model: Any) -> ComponentInfo:
        return ComponentInfo(
            name, None, (), {k: ("F32", tuple(v.shape)) for k, v in model.state_dict().items()}
        )

    clip_l = CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
    )
    clip_g = CLIPTextConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        projection_dim=1280,
    )
    with torch.device("meta"):
        sd1 = {"unet": UNet2DConditionModel(cross_attention_dim=768), "text_encoder": CLIPTextModel(clip_l)}
        sd2 = {
            "unet": UNet2DConditionModel(
                cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
            )
        }
        sdxl = {
            "unet": UNet2DConditionModel(
                block_out_channels=(320, 640, 1280),
                transformer_layers_per_block=(1, 2, 10),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(5, 10, 20),
                use_linear_projection=True,
                cross_attention_dim=2048,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            ),
            "text_encoder": CLIPTextModel(clip_l),
            "text_encoder_2": CLIPTextModelWithProjection(clip_g),
        }
    return {
        family: BaseInfo(
            "diffusers_folder",
            family,
            f"{family} skeleton",
            None,
            "float32",
            {n: component(n, m) for n, m in models.items()},
            0,
            0,
        )
        for family, models in (("sd1", sd1), ("sd2", sd2), ("sdxl", sdxl))
    }


# real file -> (family of the skeleton it must fit exactly, modules)
FITS = {
    "wellCh4n_pokemon_diffusers/pytorch_lora_weights.safetensors": ("sd1", 128),
    "catundchat_sd15_lora/pytorch_lora_weights.safetensors": ("sd1", 128),
    "qwerty_aditya_rick_and_morty/pytorch_lora_weights.safetensors": ("sd1", 128),
    "timohavdk_sd_lora/pytorch_lora_weights.safetensors": ("sd1", 128),
    "hirvita6_flower/pytorch_lora_weights.safetensors": ("sd1", 128),
    "lycoris_lokr/smart_falcon_8_lokr.safetensors": ("sd1", 350),  # TE, attention, resnet convs (flattened)
    "justinjiang_lora2/pytorch_lora_weights.safetensors": ("sd2", 128),
    "vfph55_my_lora/pytorch_lora_weights.safetensors": ("sd2", 128),
}


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(FITS))
def test_real_loras_fit_full_size_architectures(skeletons: dict[str, BaseInfo], name: str) -> None:
    if not REALDATA.is_dir():
        pytest.skip(f"real third-party files not available at {REALDATA}")
    family, count = FITS[name]
    lora = inspect_lora(read_header(REALDATA / name))
    report = check_lora_against_base(lora, skeletons[family])
    assert (report.checked, report.matched, report.total, report.missing, report.shape_mismatches) == (
        True,
        count,
        count,
        (),
        (),
    )
    assert report.family_conflict is None
    other = check_lora_against_base(lora, skeletons["sd2" if family == "sd1" else "sd1"])
    assert other.family_conflict is not None
    if (
        lora.format != "lycoris_lokr"
    ):  # same module names, different cross-attention width: 16 blocks x (k, v)
        assert len(other.shape_mismatches) == 20 and other.matched == count - 32
        assert all("attn2.to_k" in m or "attn2.to_v" in m for m in other.shape_mismatches)


@pytest.mark.realdata
def test_kohya_manifests_fit_full_size_architectures(skeletons: dict[str, BaseInfo]) -> None:
    manifests = REALDATA / "manifests"
    if not manifests.is_dir():
        pytest.skip(f"{manifests} not available")
    sd15 = inspect_lora(
        header_from_manifest(manifests / "invokeai_probe_shinkai_makoto_offset_sd15_kohya.json")
    )
    report = check_lora_against_base(sd15, skeletons["sd1"])  # incl. 1x1-conv proj_in and text_model_ names
    assert (report.checked, report.matched, report.total, report.shape_mismatches) == (True, 264, 264, ())
    sdxl = inspect_lora(header_from_manifest(manifests / "invokeai_probe_alien_style_sdxl_kohya.json"))
    report = check_lora_against_base(sdxl, skeletons["sdxl"])
    assert (report.matched, report.total, report.unchecked_components) == (
        264,
        264,
        ("unet",),
    )  # SGM UNet names
    flux = inspect_lora(read_header(REALDATA / "leighwoods_public_loras/lora.safetensors"))
    report = check_lora_against_base(flux, skeletons["sd1"])
    assert report.family_conflict is not None and report.family_conflict.startswith(
        "the LoRA is a FLUX.1 LoRA"
    )
    assert report.missing[0].endswith("(the base has no transformer)")
