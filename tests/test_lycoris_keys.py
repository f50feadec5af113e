"""lorarecipe.inspect.lycoris_keys: modules, algorithms, ranks and ΔW shapes from a header alone.

Oracles: shapes written by hand from the LyCORIS/PEFT layouts, adapters that PEFT itself saves, the
real kohya LoKr files in ../shared/realdata (ΔW checked against lycoris.functional) and InvokeAI's key
manifests of real files (shared/realdata/loras/SOURCES.md).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

from lorarecipe.inspect import SafetensorsHeader, TensorInfo, read_header
from lorarecipe.inspect.lycoris_keys import LycorisInfo, LycorisModule, fits, inspect_lycoris
from lorarecipe.inspect.safetensors_header import DTYPE_BITS
from lorarecipe.runner.adapter_math import dora_weight, loha_delta, lokr_delta, lora_delta

REPO = Path(__file__).resolve().parents[1]
LOKR_FILES = REPO.parent / "shared" / "realdata" / "loras" / "lycoris_lokr"
MANIFESTS = REPO.parent / "shared" / "realdata" / "loras" / "manifests"


def header_from_shapes(
    shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None
) -> SafetensorsHeader:
    return _header("<test>", {k: ("F32", s) for k, s in shapes.items()}, metadata or {})


def header_from_manifest(path: Path) -> SafetensorsHeader:
    """A manifest {key: {shape, dtype?}} -> the header such a file would have (keys and shapes only)."""
    entries = json.loads(path.read_text())["tensors"].items()
    return _header(str(path), {k: (e.get("dtype", "F16"), tuple(e["shape"])) for k, e in entries}, {})


def _header(
    path: str, entries: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping[str, str]
) -> SafetensorsHeader:
    tensors, offset = {}, 0
    for key, (dtype, shape) in entries.items():
        size = DTYPE_BITS[dtype] * math.prod(shape) // 8
        tensors[key] = TensorInfo(key, dtype, shape, offset, offset + size)
        offset += size
    return SafetensorsHeader(path, offset + 8, 0, MappingProxyType(tensors), MappingProxyType(dict(metadata)))


def assert_every_key_accounted_for(header: SafetensorsHeader, info: LycorisInfo) -> None:
    placed = [k for m in info.modules for k in m.keys] + [u.key for u in info.unclassified]
    assert sorted(placed) == sorted(header.tensors), "a key was dropped or counted twice"


def only(info: LycorisInfo) -> LycorisModule:
    assert not info.unclassified, info.unclassified
    assert len(info.modules) == 1, info.modules
    return info.modules[0]


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import sys, lorarecipe.inspect.lycoris_keys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Every algorithm and key layout, from hand-written shapes
# ---------------------------------------------------------------------------------------------

K = "lora_unet_down_blocks_0_resnets_0_conv1"
CASES: dict[str, tuple[dict[str, tuple[int, ...]], dict[str, object]]] = {
    "kohya-lora-linear": (
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
         "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4),
         "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()},
        {"algorithm": "lora", "rank": 4, "effective_rank": 4, "delta_shape": (320, 320), "layout": "kohya",
         "component": "unet", "module": "down_blocks_0_attentions_0_proj_in", "convention": "lycoris",
         "alpha_source": "key"},
    ),
    "kohya-locon-3x3": (
        {f"{K}.lora_down.weight": (8, 320, 3, 3), f"{K}.lora_up.weight": (320, 8, 1, 1), f"{K}.alpha": ()},
        {"algorithm": "lora", "rank": 8, "effective_rank": 8, "delta_shape": (320, 320, 3, 3)},
    ),
    "kohya-locon-tucker": (
        {f"{K}.lora_down.weight": (8, 320, 1, 1), f"{K}.lora_mid.weight": (8, 8, 3, 3),
         f"{K}.lora_up.weight": (320, 8, 1, 1), f"{K}.alpha": ()},
        {"algorithm": "locon-tucker", "rank": 8, "effective_rank": 8, "delta_shape": (320, 320, 3, 3)},
    ),
    "kohya-loha-te": (
        {"lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": (3072, 8),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_b": (8, 768),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w2_a": (3072, 8),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w2_b": (8, 768),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": ()},
        {"algorithm": "loha", "rank": 8, "effective_rank": 64, "delta_shape": (3072, 768),
         "component": "text_encoder", "module": "text_model_encoder_layers_0_mlp_fc1"},
    ),
    "kohya-loha-conv-flat": (
        {f"{K}.hada_w1_a": (320, 4), f"{K}.hada_w1_b": (4, 2880), f"{K}.hada_w2_a": (320, 4),
         f"{K}.hada_w2_b": (4, 2880), f"{K}.alpha": ()},
        {"algorithm": "loha", "rank": 4, "effective_rank": 16, "delta_shape": (320, 2880)},
    ),
    "kohya-loha-tucker": (
        {f"{K}.hada_w1_a": (8, 320), f"{K}.hada_w1_b": (8, 320), f"{K}.hada_t1": (8, 8, 3, 3),
         f"{K}.hada_w2_a": (8, 320), f"{K}.hada_w2_b": (8, 320), f"{K}.hada_t2": (8, 8, 3, 3), f"{K}.alpha": ()},
        {"algorithm": "loha-tucker", "rank": 8, "effective_rank": 64, "delta_shape": (320, 320, 3, 3)},
    ),
    "lycoris-lokr-full": (
        {"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": (8, 8),
         "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": (384, 384),
         "lycoris_transformer_blocks_0_attn_to_q.alpha": ()},
        {"algorithm": "lokr-full", "rank": None, "effective_rank": 8 * 384, "delta_shape": (3072, 3072),
         "layout": "lycoris", "component": "transformer", "convention": "lycoris"},
    ),
    "kohya-te2-lokr-decomposed": (
        {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lokr_w1": (4, 4),
         "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lokr_w2_a": (320, 16),
         "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lokr_w2_b": (16, 320),
         "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha": ()},
        {"algorithm": "lokr-decomposed", "rank": 16, "effective_rank": 64, "delta_shape": (1280, 1280),
         "component": "text_encoder_2"},
    ),
    "kohya-lokr-conv-4d": (
        {f"{K}.lokr_w1": (4, 4), f"{K}.lokr_w2": (80, 80, 3, 3), f"{K}.alpha": ()},
        {"algorithm": "lokr-full", "rank": None, "effective_rank": 4 * 80, "delta_shape": (320, 320, 3, 3)},
    ),
    "kohya-lokr-tucker": (
        {f"{K}.lokr_w1": (4, 4), f"{K}.lokr_t2": (8, 8, 3, 3), f"{K}.lokr_w2_a": (8, 80),
         f"{K}.lokr_w2_b": (8, 80), f"{K}.alpha": ()},
        {"algorithm": "lokr-tucker", "rank": 8, "effective_rank": 32, "delta_shape": (320, 320, 3, 3)},
    ),
    "kohya-lokr-old-order-conv": (  # smart_falcon's layout: the kernel is spread over both factors
        {f"{K}.lokr_w1_a": (20, 4), f"{K}.lokr_w1_b": (4, 60), f"{K}.lokr_w2_a": (16, 4),
         f"{K}.lokr_w2_b": (4, 48), f"{K}.alpha": ()},
        {"algorithm": "lokr-decomposed", "rank": 4, "effective_rank": 16, "delta_shape": (320, 2880)},
    ),
    "diffusers-peft-dora": (
        {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 3072),
         "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 4),
         "transformer.single_transformer_blocks.0.attn.to_q.lora_magnitude_vector": (3072,)},
        {"algorithm": "lora", "layout": "diffusers", "component": "transformer",
         "module": "single_transformer_blocks.0.attn.to_q", "convention": "peft", "dora": "dora-peft",
         "dora_axis": "row", "alpha_source": "none"},
    ),
    "onetrainer-dora-column": (
        {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 768),
         "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (3072, 4),
         "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": (),
         "lora_te1_text_model_encoder_layers_0_mlp_fc1.dora_scale": (1, 768)},
        {"algorithm": "lora", "dora": "dora-lycoris", "dora_axis": "column", "component": "text_encoder"},
    ),
    "ldm-prefix": (
        {"diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": (16, 3072),
         "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": (3072, 16)},
        {"algorithm": "lora", "layout": "ldm", "component": "transformer", "module": "double_blocks.0.img_attn.proj",
         "convention": "peft"},
    ),
    "old-diffusers-unet": (
        {"unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": (4, 320),
         "unet.down_blocks.0.attentions.0.proj_in.lora.up.weight": (320, 4)},
        {"layout": "diffusers", "component": "unet", "module": "down_blocks.0.attentions.0.proj_in"},
    ),
    "peft-raw-text-encoder": (
        {"base_model.model.text_encoder.encoder.layers.0.self_attn.q_proj.hada_w1_a": (768, 4),
         "base_model.model.text_encoder.encoder.layers.0.self_attn.q_proj.hada_w1_b": (4, 768),
         "base_model.model.text_encoder.encoder.layers.0.self_attn.q_proj.hada_w2_a": (768, 4),
         "base_model.model.text_encoder.encoder.layers.0.self_attn.q_proj.hada_w2_b": (4, 768)},
        {"algorithm": "loha", "layout": "peft", "component": "text_encoder",
         "module": "encoder.layers.0.self_attn.q_proj", "convention": "peft"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_each_layout_and_algorithm_is_classified(name: str) -> None:
    shapes, expected = CASES[name]
    header = header_from_shapes(shapes)
    module = only(inspect_lycoris(header))
    assert {field: getattr(module, field) for field in expected} == expected
    assert module.keys == tuple(sorted(shapes))


LORA_ROLES = {"lora_down.weight": "down", "lora_A.weight": "down", "lora.down.weight": "down",
              "lora_up.weight": "up", "lora_B.weight": "up", "lora.up.weight": "up", "lora_mid.weight": "mid"}  # fmt: skip


def delta_from(module: LycorisModule, tensors: Mapping[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """Route a detected module to its adapter_math formula (what the executors will do later)."""
    role = {}
    for key, tensor in tensors.items():
        suffix = key[len(module.stem) + 1 :]
        role[LORA_ROLES.get(suffix, suffix.removeprefix("lokr_").removeprefix("hada_"))] = tensor
    rank = module.rank or 1
    if module.algorithm in ("lora", "locon-tucker"):
        return lora_delta(role["down"], role["up"], role.get("mid"), alpha=alpha, rank=rank)
    if module.algorithm.startswith("loha"):
        parts = (role.get(n) for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"))
        return loha_delta(*parts, alpha=alpha, rank=rank, shape=module.delta_shape)  # type: ignore[arg-type]
    w1 = role["w1"] if "w1" in role else (role["w1_a"], role["w1_b"])
    if "w2" in role:
        w2: object = role["w2"]
    else:
        w2 = (role["t2"], role["w2_a"], role["w2_b"]) if "t2" in role else (role["w2_a"], role["w2_b"])
    convention = module.convention
    return lokr_delta(w1, w2, alpha=alpha, rank=module.rank, shape=module.delta_shape, convention=convention)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", CASES)
def test_detected_delta_shape_is_what_adapter_math_builds(name: str) -> None:
    """Ties the header reading to the math: random tensors of the header's shapes give exactly ΔW of
    ``delta_shape`` and rank ``effective_rank`` (a generic-position bound, reached by random factors)."""
    shapes, _ = CASES[name]
    module = only(inspect_lycoris(header_from_shapes(shapes)))
    generator = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=generator) for k, s in shapes.items()}
    delta = delta_from(module, tensors, alpha=float(module.rank or 1))
    assert tuple(delta.shape) == module.delta_shape
    assert fits(module, tuple(delta.shape))
    if math.prod(delta.shape) <= 4_000_000:
        rank = int(
            torch.linalg.matrix_rank(delta.double().reshape(delta.shape[0], -1), rtol=1e-4)
        )  # fp32 noise
        assert rank == module.effective_rank
    if module.dora is not None:
        magnitude = next(
            t for k, t in tensors.items() if k.endswith(("dora_scale", "magnitude_vector"))
        ).abs()
        base = torch.randn(*delta.shape, generator=generator)
        assert dora_weight(base, delta, magnitude, module.dora_axis).shape == delta.shape  # type: ignore[arg-type]


def test_fits_compares_rows_and_element_count() -> None:
    module = only(inspect_lycoris(header_from_shapes(CASES["kohya-loha-conv-flat"][0])))
    assert (
        fits(module, (320, 320, 3, 3)) and not fits(module, (320, 2880, 2)) and not fits(module, (2880, 320))
    )


# ---------------------------------------------------------------------------------------------
# Keys no rule applies to: never dropped silently
# ---------------------------------------------------------------------------------------------

BAD = {
    "lokr_t1": ({f"{K}.lokr_w1_a": (4, 2), f"{K}.lokr_t1": (2, 2, 3, 3), f"{K}.lokr_w2": (80, 80)}, "lokr_t1"),
    "full-diff": ({f"{K}.diff": (320, 320, 3, 3)}, "full-weight difference"),
    "oft": ({f"{K}.oft_blocks": (4, 80, 80)}, "OFT"),
    "mixed": ({f"{K}.lora_down.weight": (4, 320), f"{K}.lora_up.weight": (320, 4), f"{K}.lokr_w1": (4, 4)}, "mixes"),
    "alpha-only": ({f"{K}.alpha": ()}, "without any adapter factors"),
    "lokr-missing-w2": ({f"{K}.lokr_w1": (4, 4), f"{K}.alpha": ()}, "LoKr W2"),
    "lora-rank-mismatch": ({f"{K}.lora_down.weight": (4, 320), f"{K}.lora_up.weight": (320, 8)}, "does not match"),
    "loha-half-missing": ({f"{K}.hada_w1_a": (320, 4), f"{K}.hada_w1_b": (4, 320)}, "lacks"),
    "norm-scale": ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "no adapter rule"),
    "duplicate-factor": (
        {f"{K}.lora_down.weight": (4, 320), f"{K}.lora_A.weight": (4, 320), f"{K}.lora_up.weight": (320, 4)},
        "two keys hold the module's 'down' factor",
    ),
    "both-dora": (
        {f"{K}.lora_down.weight": (4, 320), f"{K}.lora_up.weight": (320, 4), f"{K}.dora_scale": (1, 320),
         f"{K}.lora_magnitude_vector": (320,)},
        "both a LyCORIS dora_scale",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", BAD)
def test_keys_no_rule_applies_to_are_reported_with_the_reason(name: str) -> None:
    shapes, reason = BAD[name]
    header = header_from_shapes(
        {**shapes, "lora_te_x.lora_down.weight": (2, 8), "lora_te_x.lora_up.weight": (8, 2)}
    )
    info = inspect_lycoris(header)
    assert [m.stem for m in info.modules] == ["lora_te_x"]
    assert sorted(u.key for u in info.unclassified) == sorted(shapes)
    assert all(reason in u.reason for u in info.unclassified), info.unclassified
    assert_every_key_accounted_for(header, info)


def test_an_undecidable_dora_axis_is_kept_as_a_note_not_a_guess() -> None:
    shapes = {f"{K}.lora_down.weight": (4, 320), f"{K}.lora_up.weight": (320, 4), f"{K}.dora_scale": (320,)}
    module = only(inspect_lycoris(header_from_shapes(shapes)))
    assert (module.dora, module.dora_axis) == ("dora-lycoris", None)
    assert any("fits both" in note for note in module.notes)


# ---------------------------------------------------------------------------------------------
# Scale convention and alpha of PEFT-saved files
# ---------------------------------------------------------------------------------------------


def test_a_peft_saved_lokr_is_read_with_the_peft_convention_and_its_config(tmp_path: Path) -> None:
    """PEFT writes no alpha tensors: r and α (with rank_pattern / alpha_pattern) come from adapter_config.json.
    The detected values fed to lokr_delta reproduce PEFT's own merge."""
    peft = pytest.importorskip("peft")
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(64, 48)
            self.conv3 = nn.Conv2d(32, 48, 3, padding=1)

    torch.manual_seed(0)
    config = peft.LoKrConfig(r=8, alpha=6, target_modules=["lin", "conv3"], init_weights=False,
                             rank_pattern={"conv3": 2}, alpha_pattern={"conv3": 3})  # fmt: skip
    model = peft.get_peft_model(Tiny(), config)
    model.save_pretrained(tmp_path)
    header = read_header(tmp_path / "adapter_model.safetensors")
    info = inspect_lycoris(header, adapter_config=json.loads((tmp_path / "adapter_config.json").read_text()))
    assert info.convention == "peft" and not info.unclassified
    found = {m.module: m for m in info.modules}
    assert {n: (m.algorithm, m.rank, m.alpha, m.layout) for n, m in found.items()} == {
        "lin": ("lokr-full", 8, 6.0, "peft"),
        "conv3": ("lokr-decomposed", 2, 3.0, "peft"),
    }
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, module in found.items():
        layer = getattr(model.base_model.model, name)
        ours = delta_from(module, {k: tensors[k] for k in module.keys}, alpha=module.alpha or 0.0)
        assert torch.equal(
            ours.reshape(layer.get_base_layer().weight.shape), layer.get_delta_weight("default")
        ), name


def test_diffusers_lora_adapter_metadata_gives_alpha_per_component() -> None:
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8,
                                                 "transformer.alpha_pattern": {"to_q": 2}})}  # fmt: skip
    shapes = {f"transformer.blocks.0.attn.{p}.lora_{ab}.weight": s for p in ("to_q", "to_k")
              for ab, s in (("A", (4, 64)), ("B", (64, 4)))}  # fmt: skip
    info = inspect_lycoris(header_from_shapes(shapes, meta))
    assert {m.module: (m.alpha, m.alpha_source) for m in info.modules} == {
        "blocks.0.attn.to_q": (2.0, "metadata"),
        "blocks.0.attn.to_k": (8.0, "metadata"),
    }


# ---------------------------------------------------------------------------------------------
# Real files: kohya-named old-layout LoKr (SD1.x), and InvokeAI's key manifests
# ---------------------------------------------------------------------------------------------

LOKR_NAMES = ["smart_falcon_4_lokr", "smart_falcon_8_lokr", "smart_falcon_16_lokr"]


def real_file(folder: Path, name: str) -> Path:
    if not (folder / name).is_file():
        pytest.skip(
            f"real third-party file {folder / name} not available (see shared/realdata/loras/SOURCES.md)"
        )
    return folder / name


@pytest.mark.realdata
@pytest.mark.parametrize("name", LOKR_NAMES)
def test_real_lokr_files_are_350_lokr_modules_with_no_unclassified_key(name: str) -> None:
    header = read_header(real_file(LOKR_FILES, f"{name}.safetensors"))
    info = inspect_lycoris(header)
    assert len(info.modules) == 350 and not info.unclassified
    assert info.algorithms == (("lokr-decomposed", 350),) and info.convention == "lycoris"
    assert {m.component for m in info.modules} == {"unet", "text_encoder"}
    assert all(m.alpha_source == "key" and m.layout == "kohya" for m in info.modules)
    assert_every_key_accounted_for(header, info)


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("name", LOKR_NAMES)
def test_real_lokr_files_delta_equals_lycoris_functional_for_every_module(name: str) -> None:
    lokr = pytest.importorskip("lycoris.functional.lokr")
    from safetensors import safe_open

    path = real_file(LOKR_FILES, f"{name}.safetensors")
    info = inspect_lycoris(read_header(path))
    with safe_open(str(path), "pt") as handle:
        for module in info.modules:
            part = {key.rsplit(".", 1)[1]: handle.get_tensor(key).float() for key in module.keys}
            w1a, w1b, w2a, w2b = (part[f"lokr_{p}"] for p in ("w1_a", "w1_b", "w2_a", "w2_b"))
            alpha = float(part["alpha"])
            ours = lokr_delta((w1a, w1b), (w2a, w2b), alpha=alpha, rank=module.rank, shape=module.delta_shape)
            theirs = lokr.diff_weight(None, w1a, w1b, None, w2a, w2b, None, gamma=alpha, backend="torch")
            assert torch.equal(ours, theirs.reshape(module.delta_shape)), module.stem


MANIFEST_NAMES = sorted(p.name for p in MANIFESTS.glob("*.json")) or ["(manifests absent)"]
NOT_ADAPTER_KEYS = {  # manifest -> the suffix of keys that are full tensors, not adapter factors
    "invokeai_flux_control_lora_format.json": "_norm.scale",  # BFL control LoRA: replacement norm scales
}


@pytest.mark.realdata
@pytest.mark.parametrize("name", MANIFEST_NAMES)
def test_real_key_manifests_classify_every_key(name: str) -> None:
    header = header_from_manifest(real_file(MANIFESTS, name))
    info = inspect_lycoris(header)
    assert_every_key_accounted_for(header, info)
    suffix = NOT_ADAPTER_KEYS.get(name)
    assert all(suffix and u.key.endswith(suffix) for u in info.unclassified), info.unclassified[:3]
    assert info.modules and all(m.component != "unknown" for m in info.modules)


@pytest.mark.realdata
def test_real_manifest_details() -> None:
    def read(name: str) -> LycorisInfo:
        return inspect_lycoris(header_from_manifest(real_file(MANIFESTS, f"invokeai_{name}.json")))

    dora = read("flux_dora_onetrainer_format")
    assert len(dora.modules) == 506 and {(m.dora, m.dora_axis) for m in dora.modules} == {
        ("dora-lycoris", "column")
    }
    assert {m.component for m in dora.modules} == {"text_encoder", "text_encoder_2", "transformer"}
    bfl = read("flux_lokr_bfl_format")
    assert bfl.algorithms == (("lokr-full", 6),) and {m.layout for m in bfl.modules} == {"ldm"}
    qwen = read("qwen_image_lora_kohya_format")
    assert qwen.algorithms == (("lokr-full", 8),) and {m.component for m in qwen.modules} == {"transformer"}
    anima = read("anima_lora_lokr_format")
    by_dora = {m.module: (m.dora, m.dora_axis) for m in anima.modules}
    assert by_dora["blocks.0.cross_attn.k_proj"] == ("dora-lycoris", None)  # (2048,) vs ΔW 16384²: see notes
    assert by_dora["blocks.0.self_attn.k_proj"] == (None, None)
    control = read("flux_control_lora_format")
    assert (
        len(control.unclassified) == 152
        and sum("bias delta" in n for m in control.modules for n in m.notes) == 314
    )
    assert read("flux_lora_diffusers_base_model_format").convention == "peft"
    assert read("probe_alien_style_sdxl_kohya").convention == "lycoris"
