"""lorarecipe.inspect.lora_keys: what a LoRA file is, from its header alone.

Oracles: the real third-party files and InvokeAI key manifests documented in
shared/research/real-cases.md §1, and LoRA files that peft/diffusers themselves write.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from lorarecipe.inspect import LoraInfo, SafetensorsHeader, TensorInfo, inspect_lora, read_header
from lorarecipe.inspect.safetensors_header import DTYPE_BITS

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "loras"


def header_from_manifest(path: Path) -> SafetensorsHeader:
    """A manifest {key: {shape, dtype?}} -> the header such a file would have (no bytes needed)."""
    tensors: dict[str, TensorInfo] = {}
    offset = 0
    for key, entry in json.loads(path.read_text())["tensors"].items():
        dtype = entry.get("dtype", "F16")
        size = DTYPE_BITS[dtype] * math.prod(entry["shape"]) // 8
        tensors[key] = TensorInfo(key, dtype, tuple(entry["shape"]), offset, offset + size)
        offset += size
    return SafetensorsHeader(str(path), offset + 8, 0, MappingProxyType(tensors), MappingProxyType({}))


def header_from_shapes(
    shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None
) -> SafetensorsHeader:
    tensors, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * math.prod(shape)
        tensors[key] = TensorInfo(key, "F16", shape, offset, offset + size)
        offset += size
    return SafetensorsHeader(
        "<test>", offset + 8, 0, MappingProxyType(tensors), MappingProxyType(metadata or {})
    )


# file -> (format, family, components, ranks, modules, alpha_source, unsupported needle or None)
REAL_FILES: dict[str, tuple[str, str | None, tuple[str, ...], tuple[int, ...], int, str, str | None]] = {
    "cloneofsimo_lora/lora_disney.safetensors": (
        "cloneofsimo",
        "sd1",
        ("unet", "text_encoder"),
        (1,),
        192,
        "default (alpha = rank)",
        "cloneofsimo",
    ),
    "cloneofsimo_lora/lora_disney_inpainting.safetensors": (
        "cloneofsimo",
        "sd1",
        ("unet", "text_encoder"),
        (1,),
        192,
        "default (alpha = rank)",
        "cloneofsimo",
    ),
    "cloneofsimo_lora/analog_svd_rank4.safetensors": (
        "cloneofsimo",
        "sd1",
        ("unet", "text_encoder"),
        (4,),
        192,
        "default (alpha = rank)",
        "cloneofsimo",
    ),
    "lycoris_lokr/smart_falcon_4_lokr.safetensors": (
        "lycoris_lokr",
        "sd1",
        ("unet", "text_encoder"),
        (4,),
        350,
        "keys",
        "LoKr",
    ),
    "lycoris_lokr/smart_falcon_8_lokr.safetensors": (
        "lycoris_lokr",
        "sd1",
        ("unet", "text_encoder"),
        (8,),
        350,
        "keys",
        "LoKr",
    ),
    "lycoris_lokr/smart_falcon_16_lokr.safetensors": (
        "lycoris_lokr",
        "sd1",
        ("unet", "text_encoder"),
        (16,),
        350,
        "keys",
        "LoKr",
    ),
    "leighwoods_public_loras/lora.safetensors": (
        "peft",
        "flux",
        ("transformer",),
        (16,),
        4,
        "default (alpha = rank)",
        None,
    ),
    "wellCh4n_pokemon_diffusers/pytorch_lora_weights.safetensors": (
        "attn_procs",
        "sd1",
        ("unet",),
        (4,),
        128,
        "default (alpha = rank)",
        None,
    ),
    "catundchat_sd15_lora/pytorch_lora_weights.safetensors": (
        "attn_procs",
        "sd1",
        ("unet",),
        (4,),
        128,
        "default (alpha = rank)",
        None,
    ),
    "qwerty_aditya_rick_and_morty/pytorch_lora_weights.safetensors": (
        "attn_procs",
        "sd1",
        ("unet",),
        (4,),
        128,
        "default (alpha = rank)",
        None,
    ),
    "timohavdk_sd_lora/pytorch_lora_weights.safetensors": (
        "diffusers_old",
        "sd1",
        ("unet",),
        (4,),
        128,
        "default (alpha = rank)",
        None,
    ),
    "timohavdk_sd_lora/2100-lora.safetensors": (
        "diffusers_old",
        "sd1",
        ("unet",),
        (4,),
        128,
        "default (alpha = rank)",
        None,
    ),
    "timohavdk_sd_lora/new.safetensors": (
        "kohya",
        "sd1",
        ("unet",),
        (4,),
        128,
        "default (alpha = rank)",
        "'lora_unet_unet_'",
    ),
    "hirvita6_flower/pytorch_lora_weights.safetensors": (
        "diffusers_old",
        "sd1",
        ("unet",),
        (4,),
        128,
        "default (alpha = rank)",
        None,
    ),
    "justinjiang_lora2/pytorch_lora_weights.safetensors": (
        "diffusers_old",
        "sd2",
        ("unet",),
        (4,),
        128,
        "default (alpha = rank)",
        None,
    ),
    "vfph55_my_lora/pytorch_lora_weights.safetensors": (
        "diffusers_old",
        "sd2",
        ("unet",),
        (4,),
        128,
        "default (alpha = rank)",
        None,
    ),
}


@pytest.fixture(scope="module")
def real() -> dict[str, LoraInfo]:
    if not REALDATA.is_dir():
        pytest.skip(f"real third-party files not available at {REALDATA} (see research/real-cases.md)")
    return {name: inspect_lora(read_header(REALDATA / name)) for name in REAL_FILES}


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_files_are_recognized(real: dict[str, LoraInfo], name: str) -> None:
    fmt, family, components, ranks, count, alpha_source, needle = REAL_FILES[name]
    info = real[name]
    assert (info.format, info.family, info.components, info.ranks) == (fmt, family, components, ranks)
    assert (len(info.modules), info.alpha_source) == (count, alpha_source)
    if needle is None:
        assert info.unsupported is None
    else:
        assert info.unsupported is not None and needle in info.unsupported


@pytest.mark.realdata
def test_real_file_details(real: dict[str, LoraInfo]) -> None:
    disney = real["cloneofsimo_lora/lora_disney.safetensors"]
    assert disney.unrecognized_keys == ("<s1>", "<s2>")  # textual-inversion embeddings
    flux = real["leighwoods_public_loras/lora.safetensors"]
    assert flux.metadata["ss_base_model_version"] == "sd_1.5"  # wrong, and ignored
    assert "3072" in flux.family_evidence
    assert {(m.in_features, m.out_features) for m in flux.modules} == {(15360, 3072)}
    sd2 = real["justinjiang_lora2/pytorch_lora_weights.safetensors"]
    assert sd2.family_evidence == "attn2.to_k input width 1024 (SD 2.x text encoder)"
    lokr = real["lycoris_lokr/smart_falcon_8_lokr.safetensors"]
    assert all(m.alpha is None for m in lokr.modules)  # .alpha keys present, values not in the header
    malformed = real["timohavdk_sd_lora/new.safetensors"].unsupported or ""
    assert "lora_unet_unet_down_blocks_0" in malformed and "'.lora_down.weight'" in malformed


@pytest.mark.realdata
def test_attn_procs_names_are_converted_to_diffusers_module_paths(real: dict[str, LoraInfo]) -> None:
    old = real["catundchat_sd15_lora/pytorch_lora_weights.safetensors"]
    current = real["timohavdk_sd_lora/pytorch_lora_weights.safetensors"]  # same modules, diffusers names
    assert {m.name for m in old.modules} == {m.name for m in current.modules}
    assert "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0" in {m.name for m in old.modules}
    assert {(m.name, m.in_features, m.out_features) for m in old.modules} == {
        (m.name, m.in_features, m.out_features) for m in current.modules
    }


# manifest -> (format, family, components, unsupported needle or None, unrecognized count)
MANIFESTS: dict[str, tuple[str, str | None, tuple[str, ...], str | None, int]] = {
    "invokeai_probe_shinkai_makoto_offset_sd15_kohya": ("kohya", "sd1", ("unet", "text_encoder"), None, 0),
    "invokeai_probe_alien_style_sdxl_kohya": (
        "kohya",
        "sdxl",
        ("unet", "text_encoder", "text_encoder_2"),
        None,
        0,
    ),
    "invokeai_flux_lora_kohya_format": ("kohya", "flux", ("transformer",), None, 0),
    "invokeai_flux_lora_kohya_with_te1_format": ("kohya", "flux", ("transformer", "text_encoder"), None, 0),
    "invokeai_flux_lora_diffusers_format": ("peft", "flux", ("transformer",), None, 0),
    "invokeai_flux_lora_diffusers_no_proj_mlp_format": ("peft", "flux", ("transformer",), None, 0),
    "invokeai_flux_lora_diffusers_base_model_format": (
        "peft",
        "flux",
        ("transformer",),
        "base_model.model.",
        0,
    ),
    "invokeai_probe_peft_adapter_model_flux": ("peft", "flux", ("transformer",), "base_model.model.", 0),
    # ai-toolkit's FLUX.1 files: BFL names lorarecipe converts itself (issue 15; diffusers loads nothing)
    "invokeai_flux_lora_aitoolkit_format": ("peft", "flux", ("transformer",), None, 0),
    "invokeai_flux_lora_xlabs_format": ("xlabs", "flux", ("transformer",), None, 0),
    "invokeai_flux_control_lora_format": ("peft", "flux", ("transformer",), None, 152),
    "invokeai_flux_dora_onetrainer_format": (
        "dora",
        "flux",
        ("transformer", "text_encoder", "text_encoder_2"),
        "DoRA",
        0,
    ),
    "invokeai_flux_lokr_bfl_format": ("lycoris_lokr", "flux", ("transformer",), "LoKr", 0),
    "invokeai_qwen_image_lora_diffusers_format": ("kohya", None, ("transformer",), "without 'lora_unet_'", 0),
    # recognized as Qwen-Image (image/text MLPs) so that it is refused on FLUX.1 naming both (issue 15)
    "invokeai_qwen_image_lora_kohya_format": ("lycoris_lokr", "qwen_image", ("transformer",), "LoKr", 0),
    "invokeai_krea2_lora_kohya_format": ("kohya", None, ("transformer",), None, 0),
    "invokeai_anima_lora_kohya_format": ("kohya", None, ("transformer",), None, 0),
    "invokeai_anima_lora_kohya_with_te_format": ("kohya", None, ("transformer", "text_encoder"), None, 0),
    "invokeai_anima_lora_peft_format": ("peft", None, ("transformer",), "diffusion_model.", 0),
    "invokeai_anima_lora_lokr_format": ("lycoris_lokr", None, ("transformer",), "LoKr", 0),
}


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifests_are_recognized(name: str) -> None:
    path = REALDATA / "manifests" / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    info = inspect_lora(header_from_manifest(path))
    fmt, family, components, needle, unrecognized = MANIFESTS[name]
    assert (info.format, info.family, info.components) == (fmt, family, components)
    assert len(info.unrecognized_keys) == unrecognized
    if needle is None:
        assert info.unsupported is None
    else:
        assert info.unsupported is not None and needle in info.unsupported
    if fmt == "kohya" and name.startswith("invokeai_probe"):
        assert info.alpha_source == "keys" and all(m.alpha is None for m in info.modules)


@pytest.mark.realdata
def test_kohya_sd15_conv_and_sdxl_sgm_names() -> None:
    sd15 = inspect_lora(
        header_from_manifest(REALDATA / "manifests/invokeai_probe_shinkai_makoto_offset_sd15_kohya.json")
    )
    proj_in = next(m for m in sd15.modules if m.name == "down_blocks_0_attentions_0_proj_in")
    assert (proj_in.component, proj_in.rank, proj_in.in_features, proj_in.out_features, proj_in.kernel) == (
        "unet",
        128,
        320,
        320,
        (1, 1),
    )
    te = next(m for m in sd15.modules if m.name == "text_model_encoder_layers_0_self_attn_q_proj")
    assert (te.component, te.in_features) == ("text_encoder", 768)
    sdxl = inspect_lora(
        header_from_manifest(REALDATA / "manifests/invokeai_probe_alien_style_sdxl_kohya.json")
    )
    assert any(m.name.startswith("input_blocks_4_1_transformer_blocks_0_attn2_to_k") for m in sdxl.modules)
    assert sdxl.family_evidence == "attn2.to_k input width 2048 (SDXL text encoders)"


def test_family_ignores_metadata_and_is_conservative() -> None:
    shapes = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 32),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": (32, 4),
    }
    tiny = inspect_lora(header_from_shapes(shapes, {"ss_base_model_version": "sdxl_base_v1-0"}))
    assert tiny.family is None and "[32]" in tiny.family_evidence
    te2 = {
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 1280),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": (1280, 4),
    }
    assert inspect_lora(header_from_shapes(te2)).family == "sdxl"
    te1_only = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": (768, 4),
    }
    assert inspect_lora(header_from_shapes(te1_only)).family is None  # SDXL or Flux: cannot tell
    te_only = {k.replace("lora_te1_", "lora_te_"): v for k, v in te1_only.items()}
    assert inspect_lora(header_from_shapes(te_only)).family == "sd1"
    sd3 = {
        "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight": (4, 1536),
        "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight": (1536, 4),
    }
    assert inspect_lora(header_from_shapes(sd3)).family == "sd3"


def test_broken_and_odd_files_never_raise() -> None:
    cases = {
        "rank mismatch": {"unet.a.lora_A.weight": (4, 8), "unet.a.lora_B.weight": (8, 2)},
        "half a pair": {"unet.a.lora_A.weight": (4, 8)},
        "scalar factor": {"unet.a.lora_A.weight": (), "unet.a.lora_B.weight": (8, 4)},
        "nothing": {"foo": (1,)},
        "mixed": {
            "unet.a.lora_A.weight": (4, 8),
            "unet.a.lora_B.weight": (8, 4),
            "lora_unet_b.lora_down.weight": (4, 8),
            "lora_unet_b.lora_up.weight": (8, 4),
        },
        "loha half": {"a.hada_w1_a": (8, 4)},
        "lokr half": {"a.lokr_w1": (2, 2)},
        "locon mid": {
            "lora_unet_a.lora_down.weight": (4, 8, 1, 1),
            "lora_unet_a.lora_up.weight": (8, 4, 1, 1),
            "lora_unet_a.lora_mid.weight": (4, 4, 3, 3),
        },
    }
    for name, shapes in cases.items():
        info = inspect_lora(header_from_shapes(shapes))
        assert info.unsupported, name
    assert inspect_lora(header_from_shapes({"foo": (1,)})).format == "unknown"
    orphan = inspect_lora(
        header_from_shapes(
            {"unet.a.lora_A.weight": (4, 8), "unet.a.lora_B.weight": (8, 4), "unet.b.alpha": ()}
        )
    )
    assert orphan.unrecognized_keys == ("unet.b.alpha",) and orphan.unsupported is None


def test_untrusted_alpha_pattern_is_matched_literally() -> None:
    meta = {
        "lora_adapter_metadata": json.dumps(
            {"unet.lora_alpha": 8, "unet.alpha_pattern": {"(a+)+$": 1, "to_k": 2}}
        )
    }
    shapes = {
        "unet.x.to_k.lora_A.weight": (4, 8),
        "unet.x.to_k.lora_B.weight": (8, 4),
        "unet.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!.lora_A.weight": (4, 8),
        "unet.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!.lora_B.weight": (8, 4),
    }
    alphas = {m.name: m.alpha for m in inspect_lora(header_from_shapes(shapes, meta)).modules}
    assert alphas == {"x.to_k": 2.0, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!": 8.0}
    for bad in (
        "not json",
        "[1]",
        json.dumps({"unet.lora_alpha": "8"}),
        json.dumps({"unet.lora_alpha": True}),
    ):
        info = inspect_lora(header_from_shapes(shapes, {"lora_adapter_metadata": bad}))
        assert info.alpha_source == "default (alpha = rank)" and {m.alpha for m in info.modules} == {4.0}


# ---- files written by peft + diffusers themselves ----


def _tiny_unet() -> Any:
    from lorarecipe.builtin.materialize import build_base_pipeline

    return build_base_pipeline("tiny-sd").unet


@pytest.fixture(scope="module")
def peft_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    from diffusers import StableDiffusionPipeline
    from peft import LoHaConfig, LoKrConfig, LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    out = tmp_path_factory.mktemp("peft")
    unet = _tiny_unet()
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
        )
    )
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
        init_lora_weights=False,
    )
    cfg_te = LoraConfig(
        r=2,
        lora_alpha=3,
        target_modules=["q_proj", "k_proj"],
        alpha_pattern={"k_proj": 5},
        init_lora_weights=False,
    )
    unet.add_adapter(cfg, adapter_name="x")
    te.add_adapter(cfg_te, adapter_name="x")
    unet_sd, te_sd = (
        get_peft_model_state_dict(unet, adapter_name="x"),
        get_peft_model_state_dict(te, adapter_name="x"),
    )
    StableDiffusionPipeline.save_lora_weights(
        out / "meta",
        unet_lora_layers=unet_sd,
        text_encoder_lora_layers=te_sd,
        unet_lora_adapter_metadata=cfg.to_dict(),
        text_encoder_lora_adapter_metadata=cfg_te.to_dict(),
    )
    StableDiffusionPipeline.save_lora_weights(
        out / "plain", unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd
    )
    files = {
        "meta": out / "meta" / "pytorch_lora_weights.safetensors",
        "plain": out / "plain" / "pytorch_lora_weights.safetensors",
    }
    for name, other in (
        ("loha", LoHaConfig(r=4, alpha=4, target_modules=["to_q", "conv1"])),
        ("lokr", LoKrConfig(r=4, alpha=4, target_modules=["to_q", "conv1"])),
        ("dora", LoraConfig(r=4, target_modules=["to_q", "conv1"], use_dora=True)),
    ):
        model = _tiny_unet()
        model.add_adapter(other, adapter_name="x")
        state = {
            f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model, adapter_name="x").items()
        }
        save_file(state, str(out / f"{name}.safetensors"))
        files[name] = out / f"{name}.safetensors"
    yield files


def test_diffusers_peft_file_alpha_from_metadata(peft_files: dict[str, Path]) -> None:
    info = inspect_lora(read_header(peft_files["meta"]))
    assert (info.format, info.components, info.ranks, info.alpha_source) == (
        "peft",
        ("unet", "text_encoder"),
        (2, 4),
        "metadata",
    )
    alphas = {(m.component, m.name.rsplit(".", 1)[-1]): m.alpha for m in info.modules}
    assert alphas[("unet", "to_q")] == 8.0 and alphas[("text_encoder", "q_proj")] == 3.0
    assert alphas[("text_encoder", "k_proj")] == 5.0  # alpha_pattern
    proj_in = next(m for m in info.modules if m.name == "down_blocks.0.attentions.0.proj_in")
    assert proj_in.kernel == (1, 1) and (proj_in.in_features, proj_in.out_features) == (32, 32)
    assert info.family is None and info.unsupported is None and not info.unrecognized_keys
    plain = inspect_lora(read_header(peft_files["plain"]))
    assert plain.alpha_source == "default (alpha = rank)"
    assert all(m.alpha == float(m.rank) for m in plain.modules)


def test_peft_lycoris_and_dora_files_are_flagged(peft_files: dict[str, Path]) -> None:
    expected = {"loha": ("lycoris_loha", "LoHa"), "lokr": ("lycoris_lokr", "LoKr"), "dora": ("dora", "DoRA")}
    for name, (fmt, needle) in expected.items():
        info = inspect_lora(read_header(peft_files[name]))
        assert info.format == fmt and needle in (info.unsupported or ""), name
        conv = next(m for m in info.modules if m.name == "down_blocks.0.resnets.0.conv1")
        assert conv.out_features == 32 and conv.in_features in (32, 32 * 9), name
        to_q = next(m for m in info.modules if m.name.endswith("attn1.to_q"))
        assert (to_q.in_features, to_q.out_features) == (32, 32), name


def test_older_diffusers_layouts_are_named_like_diffusers_modules() -> None:
    te = "text_encoder.text_model.encoder.layers.0.self_attn"
    shapes = {
        f"{te}.to_q_lora.down.weight": (4, 768),
        f"{te}.to_q_lora.up.weight": (768, 4),
        f"{te}.to_out_lora.down.weight": (4, 768),
        f"{te}.to_out_lora.up.weight": (768, 4),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight": (4, 1280),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight": (1280, 4),
    }
    info = inspect_lora(header_from_shapes(shapes))
    assert info.format == "attn_procs" and info.unsupported is None
    assert {(m.component, m.name) for m in info.modules} == {
        ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
        ("text_encoder", "text_model.encoder.layers.0.self_attn.out_proj"),
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"),
    }
    linear = {
        f"{te}.k_proj.lora_linear_layer.down.weight": (4, 768),
        f"{te}.k_proj.lora_linear_layer.up.weight": (768, 4),
    }
    old = inspect_lora(header_from_shapes(linear))
    assert (old.format, old.modules[0].name) == (
        "diffusers_old",
        "text_model.encoder.layers.0.self_attn.k_proj",
    )


def test_peft_keys_without_a_component_prefix_are_flagged() -> None:
    shapes = {
        "down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320),
        "down_blocks.0.attentions.0.proj_in.lora_B.weight": (320, 4),
    }
    info = inspect_lora(header_from_shapes(shapes))
    assert info.components == ("unet",) and "no component prefix" in (info.unsupported or "")


def test_results_are_hashable_values() -> None:
    shapes = {"unet.a.lora_A.weight": (4, 8), "unet.a.lora_B.weight": (8, 4)}
    first, second = inspect_lora(header_from_shapes(shapes)), inspect_lora(header_from_shapes(shapes))
    assert first == second and hash(first) == hash(second)
    assert hash(header_from_shapes(shapes)) == hash(header_from_shapes(shapes))


def test_public_api_is_pinned() -> None:
    import lorarecipe.inspect as api

    assert sorted(api.__all__) == sorted(
        [
            "MAX_HEADER_BYTES",
            "PICKLE_SUFFIXES",
            "BaseInfo",
            "CompatReport",
            "ComponentInfo",
            "LoraInfo",
            "LoraModule",
            "SafetensorsHeader",
            "TensorInfo",
            "check_lora_against_base",
            "inspect_diffusers_folder",
            "inspect_lora",
            "inspect_single_file",
            "parse_header_bytes",
            "read_header",
        ]
    )
    assert all(hasattr(api, name) for name in api.__all__)
