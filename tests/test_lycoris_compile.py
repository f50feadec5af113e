"""Static checks of LyCORIS/DoRA adapters at compile time, from headers only (and what ``plan`` shows).

Every key no rule applies to fails the build naming it; every module must find a base weight it fits
(the placement both executors use); PEFT merges and LoRA outputs refuse these adapters with the fix
(``extract``); the real key manifests place on full-size FLUX.1-dev / CLIP-L key tables (meta models).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorarecipe.inspect.adapter_targets import ModelKeys, place_adapter
from lorarecipe.inspect.lycoris_keys import inspect_lycoris
from tests.helpers.recipes import compile_text, messages, problems_of
from tests.test_lycoris_keys import header_from_manifest

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO.parent / "shared" / "realdata" / "loras" / "manifests"
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _lokr(folder: Path, extra: dict[str, torch.Tensor] | None = None, name: str = "k.safetensors") -> str:
    tensors = {
        f"{Q}.lokr_w1": torch.ones(4, 4),
        f"{Q}.lokr_w2": torch.ones(8, 8),
        f"{Q}.alpha": torch.tensor(1e10),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": torch.ones(37, 2),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_b": torch.ones(2, 32),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w2_a": torch.ones(37, 2),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w2_b": torch.ones(2, 32),
        **(extra or {}),
    }
    save_file(tensors, str(folder / name))
    return name


def _recipe(
    file: str, *extra: str, outputs: tuple[str, ...] = ("fused: {kind: pipeline, path: fused}",)
) -> str:
    lines = ["base: builtin:tiny-sd", "adapters:", f"  k: {{file: {file}}}", "  style: builtin:tiny-sd/style"]
    return "\n".join([*lines, *extra, "outputs:", *(f"  {o}" for o in outputs)]) + "\n"


def test_plan_shows_algorithms_ranks_convention_and_the_weights_changed(tmp_path: Path) -> None:
    plan = compile_text(tmp_path, _recipe(_lokr(tmp_path), "fuse: {adapters: [k]}"))
    check = next(c for c in plan.checks if c.subject == "adapters.k")
    assert check.status == "ok"
    assert check.detail == (
        "local k.safetensors: LyCORIS LoHa ×1, LoKr (full) ×1, factor rank 2, ΔW rank ≤ 32, scale "
        "convention lycoris; changes 1 unet + 1 text_encoder weights"
    )
    facts = dict(check.facts)
    assert facts["algorithms"] == {"lokr-full": 1, "loha": 1}
    assert facts["weights_changed"] == {"unet": 1, "text_encoder": 1}


def test_keys_no_rule_applies_to_fail_the_build_naming_them(tmp_path: Path) -> None:
    extra = {f"{Q}.oft_blocks": torch.ones(2, 2), "lora_unet_conv_in.mystery": torch.ones(3)}
    found = messages(problems_of(tmp_path, _recipe(_lokr(tmp_path, extra), "fuse: {adapters: [k]}")))
    assert len(found) == 1
    assert found[0].startswith("adapters.k: 5 tensors of the file are no adapter factor")
    assert "lora_unet_conv_in.mystery (no adapter rule applies" in found[0]
    assert f"{Q}.oft_blocks (LyCORIS OFT/BOFT block" in found[0]
    assert f"{Q}.lokr_w1 (module also has a key no rule applies to" in found[0]


def test_modules_that_fit_no_base_weight_are_named(tmp_path: Path) -> None:
    extra = {
        "lora_unet_conv_in.lokr_w1": torch.ones(4, 2),  # conv_in is 32×4×3×3: 16×… rows cannot fit
        "lora_unet_conv_in.lokr_w2": torch.ones(4, 2),
        "lora_unet_no_such_layer.lokr_w1": torch.ones(2, 2),
        "lora_unet_no_such_layer.lokr_w2": torch.ones(2, 2),
    }
    found = messages(problems_of(tmp_path, _recipe(_lokr(tmp_path, extra), "fuse: {adapters: [k]}")))
    assert len(found) == 1 and found[0].startswith(
        "adapters.k: cannot load this LoRA: 2 of 4 LoKr (full)/LoHa modules find no base weight they fit"
    )
    assert "lora_unet_conv_in: ΔW 16×4 does not fit unet.conv_in (32×4×3×3)" in found[0]
    assert "lora_unet_no_such_layer: no such module in the base's unet" in found[0]


def test_scale_convention_is_checked(tmp_path: Path) -> None:
    text = _recipe(_lokr(tmp_path), "fuse: {adapters: [k]}")
    peft = text.replace("{file: k.safetensors}", "{file: k.safetensors, scale_convention: peft}")
    found = messages(problems_of(tmp_path, peft))
    assert len(found) == 1 and found[0].startswith(
        "adapters.k.scale_convention: scale_convention 'peft' scales LoKr by alpha/r, but 1 full-matrix"
    )
    plain = text.replace(
        "style: builtin:tiny-sd/style", "style: {builtin: tiny-sd/style, scale_convention: lycoris}"
    )
    assert messages(problems_of(tmp_path, plain)) == [
        "adapters.style.scale_convention: scale_convention applies to LyCORIS LoKr files; this is a plain "
        "LoRA (scale alpha/rank)"
    ]


def test_peft_merges_and_lora_outputs_refuse_lycoris_adapters_with_the_fix(tmp_path: Path) -> None:
    text = _recipe(
        _lokr(tmp_path),
        "merges: {m: {method: cat, adapters: [k, style]}, x: {method: extract, adapters: [k, style], svd_rank: 4}}",
        outputs=("lora: {kind: lora, adapter: k, path: l}", "ok: {kind: lora, adapter: x, path: x}"),
    )
    found = messages(problems_of(tmp_path, text))
    assert found == [
        "merges.m.method: 'k' is a LyCORIS (LoHa ×1, LoKr (full) ×1) adapter, and PEFT's add_weighted_adapter "
        "('cat') merges only LoRAs [use method: extract (a truncated SVD of the summed deltas into a plain "
        "LoRA; set svd_rank), or fuse the adapter directly]",
        "outputs.lora.adapter: 'k' is a LyCORIS (LoHa ×1, LoKr (full) ×1) adapter; a 'lora' output writes a "
        "plain LoRA (lora_A/lora_B) [add a merge with method: extract, adapters: [k] and svd_rank, and write "
        "that merge]",
    ]


@pytest.mark.parametrize(
    ("merge", "needle"),
    [
        ("{method: extract, adapters: [style]}", "method 'extract' needs 'svd_rank'"),
        (
            "{method: svd, adapters: [style], svd_energy: 0.9}",
            "'svd_energy' only applies to method 'extract'",
        ),
        ("{method: extract, adapters: [style], svd_rank: 2, svd_full_matrices: false}", "PEFT options"),
        ("{method: extract, adapters: [style], svd_rank: 2, density: 0.5}", "'density' has no effect"),
    ],
)
def test_extract_parameters_are_validated(tmp_path: Path, merge: str, needle: str) -> None:
    text = textwrap.dedent(
        f"""\
        base: builtin:tiny-sd
        adapters: {{style: builtin:tiny-sd/style}}
        merges: {{m: {merge}}}
        outputs: {{l: {{kind: lora, adapter: m, path: l}}}}
        """
    )
    found = messages(problems_of(tmp_path, text))
    assert len(found) == 1 and needle in found[0], found


def test_validate_stays_torch_free_with_lycoris_files(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(_recipe(_lokr(tmp_path), "fuse: {adapters: [k]}"))
    code = (
        "import sys; from lorarecipe.cli import main; rc = main(['validate', sys.argv[1]]);"
        "print(rc, sorted(m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "r.yaml")], capture_output=True, text=True, cwd=REPO
    )
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stderr


# ---------------------------------------------------------------------------------------------
# Real key manifests placed on full-size key tables (models built on the meta device)
# ---------------------------------------------------------------------------------------------


def _meta_keys(**models: object) -> ModelKeys:
    return ModelKeys({c: {k: tuple(v.shape) for k, v in m.state_dict().items()} for c, m in models.items()})  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def flux_keys() -> ModelKeys:
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1-dev's configuration
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12))
    return _meta_keys(transformer=transformer, text_encoder=clip)


@pytest.mark.realdata
def test_onetrainer_flux_dora_places_every_transformer_and_clip_module(flux_keys: ModelKeys) -> None:
    from lorarecipe.families import FAMILIES

    info = inspect_lycoris(header_from_manifest(MANIFESTS / "invokeai_flux_dora_onetrainer_format.json"))
    report = place_adapter(info, flux_keys, FAMILIES["flux"])
    placed = {p.module.component for p in report.placed}
    assert placed == {"transformer", "text_encoder"} and len(report.placed) == 506 - 168
    assert {p.dora_axis for p in report.placed} == {"column"}
    assert len(report.problems) == 168 and all(
        "FLUX.1 takes adapters only in transformer, text_encoder, not in its text_encoder_2" in p
        for p in report.problems
    )


@pytest.mark.realdata
def test_bfl_lokr_manifest_maps_through_the_flux_table_but_its_shapes_are_not_flux1_dev(
    flux_keys: ModelKeys,
) -> None:
    """InvokeAI's BFL-named LoKr fixture: every module name maps (qkv onto to_q/to_k/to_v), but the
    transcribed factor shapes (e.g. 32×96 ⊗ 32×288 for img_attn.qkv) are not FLUX.1-dev's 9216×3072."""
    from lorarecipe.families import FAMILIES

    info = inspect_lycoris(header_from_manifest(MANIFESTS / "invokeai_flux_lokr_bfl_format.json"))
    report = place_adapter(info, flux_keys, FAMILIES["flux"])
    assert not report.placed and len(report.problems) == 6
    qkv = next(p for p in report.problems if "img_attn.qkv" in p)
    assert (
        "cannot be split into double_blocks.0.img_attn.qkv's parts" in qkv
        or "part transformer_blocks.0.attn.to_q" in qkv
    ), qkv


def test_anchored_peft_pattern_keys_name_exactly_their_module() -> None:
    """diffusers writes rank/alpha pattern keys as '^module' (PEFT reads them as anchored regexes);
    lorarecipe reads them literally: the module itself, not one that merely ends with it."""
    from lorarecipe.inspect.lycoris_keys import peft_pattern_matches

    assert peft_pattern_matches("^mid_block.attn.to_k", "mid_block.attn.to_k")
    assert not peft_pattern_matches("^attn.to_k", "mid_block.attn.to_k")
    assert peft_pattern_matches("attn.to_k", "mid_block.attn.to_k")
    assert not peft_pattern_matches("(a+)+$", "aaaa")
