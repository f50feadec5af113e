"""FLUX.1 LoRA files on the built-in tiny-flux: every layout loads with exact values, and what must be
refused is refused at compile time with both sides named.

- The built-in LoRAs (PEFT with CLIP, kohya/ComfyUI BFL names with fused qkv, linear1/linear2,
  modulation, final layer and ``lora_te1_`` CLIP, ai-toolkit, XLabs) load through lorarecipe into
  one pipeline; each module's PEFT delta (scaling·B@A) equals ``tests.helpers.lora_math``'s reading
  of the file (its own BFL table, float64), and no module is dropped or added.
- diffusers alone cannot load the tiny kohya file (its converter hard-codes FLUX.1-dev's widths).
- A Qwen-Image or FLUX.2 LoRA and a T5 LoRA are refused, naming what and why; DoRA files, which
  diffusers' loader refuses, are applied by lorarecipe itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from lorarecipe.builtin.catalog import BUILTIN_LORAS
from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.errors import UnsafeInputError
from lorarecipe.runner.pipeline.adapters import load_adapter
from tests.helpers.lora_math import lora_deltas, read_component_weights
from tests.helpers.recipes import messages, problems_of

MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "loras" / "manifests"
FLUX_LORAS = [spec for spec in BUILTIN_LORAS.values() if spec.base == "tiny-flux"]


@pytest.fixture(scope="module")
def base() -> dict[str, dict[str, torch.Tensor]]:
    folder = builtin_base_path("tiny-flux")
    return {c: read_component_weights(folder, c) for c in ("transformer", "text_encoder")}


def _injected(pipe: DiffusionPipeline, adapter: str) -> dict[tuple[str, str], torch.Tensor]:
    out = {}
    for component in ("transformer", "text_encoder"):
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                out[(component, f"{name}.weight")] = module.scaling[adapter] * (b @ a).double()
    return out


def test_every_builtin_layout_loads_with_exact_values(base: dict[str, dict[str, torch.Tensor]]) -> None:
    pipe = DiffusionPipeline.from_pretrained(builtin_base_path("tiny-flux"))
    names = {spec.name: "lr_" + spec.name.split("/")[1] for spec in FLUX_LORAS}
    assert {spec.layout for spec in FLUX_LORAS} == {"peft", "kohya", "aitk", "xlabs"}
    for spec in FLUX_LORAS:
        load_adapter(pipe, names[spec.name], builtin_lora_path(spec.name), "flux")
    for spec in FLUX_LORAS:  # after all loads: a later adapter must not disturb an earlier one
        expected = lora_deltas(builtin_lora_path(spec.name), base)
        loaded = _injected(pipe, names[spec.name])
        assert set(loaded) == set(expected), spec.name
        for key, delta in expected.items():
            torch.testing.assert_close(loaded[key], delta, atol=1e-6, rtol=0, msg=f"{spec.name} {key}")
        assert {c for c, _ in loaded} == (
            {"transformer", "text_encoder"} if spec.text_encoders else {"transformer"}
        )
    detail = {k for _, k in _injected(pipe, names["tiny-flux/detail"])}
    # the fused qkv and linear1 became q/k/v (+ proj_mlp); the final layer and modulations are there
    assert {
        "transformer_blocks.1.attn.add_v_proj.weight",
        "single_transformer_blocks.0.proj_mlp.weight",
    } <= detail
    assert {
        "norm_out.linear.weight",
        "proj_out.weight",
        "single_transformer_blocks.1.norm.linear.weight",
    } <= detail


def test_diffusers_alone_cannot_read_a_narrow_kohya_flux_lora() -> None:
    """Why lorarecipe converts FLUX.1 kohya files itself: diffusers' converter splits ``linear1`` with
    FLUX.1-dev's widths (3072, 3072, 3072, 12288) whatever the model."""
    pipe = DiffusionPipeline.from_pretrained(builtin_base_path("tiny-flux"))
    with pytest.raises(AssertionError):
        pipe.load_lora_weights(str(builtin_lora_path("tiny-flux/detail")), adapter_name="plain")


def _dora_files(folder: Path) -> dict[str, Path]:
    """A kohya BFL file with ``dora_scale`` (OneTrainer/kohya DoRA) and a PEFT file with
    ``lora_magnitude_vector``: diffusers drops the first's magnitudes with a warning."""
    kohya = load_file(str(builtin_lora_path("tiny-flux/detail")))
    kohya["lora_unet_double_blocks_0_img_attn_proj.dora_scale"] = torch.ones(1, 32)
    peft = load_file(str(builtin_lora_path("tiny-flux/style")))
    peft["transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector"] = torch.ones(32)
    paths = {"kohya": folder / "dora_kohya.safetensors", "peft": folder / "dora_peft.safetensors"}
    save_file(kohya, str(paths["kohya"]))
    save_file(peft, str(paths["peft"]))
    return paths


def test_dora_files_are_applied_by_lorarecipe_not_diffusers(
    tmp_path: Path, base: dict[str, dict[str, torch.Tensor]]
) -> None:
    """diffusers' loader still refuses DoRA (it would drop dora_scale); lorarecipe applies the files
    itself: the plan says DoRA, and the fused DoRA weight is m ⊙ (W + ΔW)/‖W + ΔW‖ per input column
    (kohya/OneTrainer ``dora_scale``, LyCORIS's float32 eps) or per output row (PEFT, no eps), every
    other module W + ΔW, with ΔW read from the file by ``tests.helpers.lora_math``."""
    from tests.helpers.lycoris_files import dora_reference
    from tests.helpers.recipes import build_text, compile_text

    paths = _dora_files(tmp_path)
    dora = {
        "kohya": ("transformer_blocks.0.attn.to_out.0.weight", "column", 2.0**-23),
        "peft": ("transformer_blocks.0.attn.to_q.weight", "row", 0.0),
    }
    for layout, path in paths.items():
        text = f"""\
            base: builtin:tiny-flux
            adapters:
              d: {{file: {path.name}}}
            fuse: {{adapters: [d]}}
            outputs:
              fused: {{kind: pipeline, path: fused-{layout}}}
            """
        plan = compile_text(tmp_path, text)
        check = next(c for c in plan.checks if c.subject == "adapters.d")
        assert check.status == "ok" and f"DoRA per {dora[layout][1]} ×1" in check.detail, check.detail
        pipe = DiffusionPipeline.from_pretrained(builtin_base_path("tiny-flux"))
        with pytest.raises(UnsafeInputError, match="DoRA"):
            load_adapter(pipe, "d", path, "flux")
        build_text(tmp_path, text, out=f"out-{layout}")
        fused = read_component_weights(tmp_path / f"out-{layout}" / f"fused-{layout}", "transformer")
        plain = load_file(str(path))
        plain = {k: v for k, v in plain.items() if "dora_scale" not in k and "magnitude" not in k}
        save_file(plain, str(tmp_path / "plain.safetensors"))
        deltas = lora_deltas(tmp_path / "plain.safetensors", base)
        key, axis, eps = dora[layout]
        for (component, name), delta in deltas.items():
            weight = base[component][name].double()
            if component == "transformer" and name == key:
                expected = dora_reference(weight, delta, torch.ones(32, dtype=torch.float64), axis, eps)
            else:
                expected = weight + delta
            got = fused[name] if component == "transformer" else None
            if got is not None:
                assert float((got.double() - expected).abs().max()) <= 2e-6, name


def _write(folder: Path, name: str, shapes: dict[str, tuple[int, ...]]) -> Path:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        k: torch.randn(s, generator=generator) * 0.01 if s else torch.tensor(4.0) for k, s in shapes.items()
    }
    path = folder / name
    save_file(tensors, str(path))
    return path


def _flux2_shapes() -> dict[str, tuple[int, ...]]:
    """A FLUX.2-dev LoRA in diffusers names: fused single-block projection, SwiGLU feed-forward."""
    shapes: dict[str, tuple[int, ...]] = {}
    for module, (inp, out) in {
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj": (6144, 55296),
        "transformer_blocks.0.ff.linear_in": (6144, 36864),
        "transformer_blocks.0.attn.to_q": (6144, 6144),
    }.items():
        shapes[f"transformer.{module}.lora_A.weight"] = (4, inp)
        shapes[f"transformer.{module}.lora_B.weight"] = (out, 4)
    return shapes


def _qwen_shapes() -> dict[str, tuple[int, ...]]:
    path = MANIFESTS / "invokeai_qwen_image_lora_kohya_format.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return {k: tuple(v["shape"]) for k, v in json.loads(path.read_text())["tensors"].items()}


@pytest.mark.parametrize(
    ("label", "shapes", "evidence"),
    [
        ("FLUX.2", _flux2_shapes, "to_qkv_mlp_proj"),
        ("Qwen-Image", _qwen_shapes, "img_mlp"),
    ],
)
def test_another_dit_family_on_flux1_names_both(
    tmp_path: Path, label: str, shapes: object, evidence: str
) -> None:
    path = _write(tmp_path, "other.safetensors", shapes())  # type: ignore[operator]
    text = f"""\
        base: builtin:tiny-flux
        adapters:
          other: {{file: {path.name}}}
        fuse: {{adapters: [other]}}
        outputs:
          fused: {{kind: pipeline, path: fused}}
        """
    found = messages(problems_of(tmp_path, text))
    assert len(found) == 1, found
    assert found[0].startswith(f"adapters.other: the LoRA is a {label} LoRA (")
    assert evidence in found[0] and found[0].endswith("but the base is FLUX.1 (built-in tiny-flux)")


def test_a_t5_lora_is_refused_on_flux1(tmp_path: Path) -> None:
    """diffusers loads FLUX.1 LoRAs into the transformer and CLIP only: T5 modules would be dropped."""
    shapes = {
        "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": (4, 32),
        "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": (32, 4),
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 32),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (32, 4),
    }
    path = _write(tmp_path, "t5.safetensors", shapes)
    text = f"""\
        base: builtin:tiny-flux
        adapters:
          t5: {{file: {path.name}}}
        fuse: {{adapters: [t5]}}
        outputs:
          fused: {{kind: pipeline, path: fused}}
        """
    found = messages(problems_of(tmp_path, text))
    assert len(found) == 1 and "1 of 2 LoRA modules do not fit the base" in found[0], found
    assert "FLUX.1 loads LoRAs only into transformer, text_encoder" in found[0]


def test_plan_names_blocks_and_fused_modules(tmp_path: Path) -> None:
    from tests.helpers.recipes import compile_text

    plan = compile_text(
        tmp_path,
        """\
        base: builtin:tiny-flux
        adapters:
          detail: builtin:tiny-flux/detail
          xlabs: builtin:tiny-flux/xlabs
        fuse: {adapters: [detail, xlabs]}
        outputs:
          fused: {kind: pipeline, path: fused}
        """,
    )
    facts = {c.subject: dict(c.facts) for c in plan.checks}
    assert (
        facts["adapters.detail"]["blocks"] == "double_blocks 0-1, single_blocks 0-1, 2 modules outside blocks"
    )
    assert facts["adapters.detail"]["fused_modules"] == 2 * 2 + 2  # img/txt qkv per double block, linear1
    assert facts["adapters.xlabs"]["blocks"] == "double_blocks 0-1"
    # the streaming estimate holds each fused module as one LoRA per part (a down copy each), and
    # for a float32 base four copies of the largest diffusers weight a LoRA reaches
    from lorarecipe.compiler.estimates import RUNTIME_OVERHEAD_BYTES

    factors = largest = 0
    for name in ("detail", "xlabs"):
        shapes = {k: v.shape for k, v in load_file(str(builtin_lora_path(f"tiny-flux/{name}"))).items()}
        for key, down in shapes.items():
            if key.endswith(("lora_down.weight", ".down.weight")):
                up = shapes[key.replace("lora_down", "lora_up").replace(".down.", ".up.")]
                parts = 4 if "linear1" in key else 3 if "qkv" in key else 1
                part_height = max(down[1], up[0] - 3 * down[1]) if parts == 4 else up[0] // parts
                factors += 4 * down[0] * (down[1] * parts + up[0])
                largest = max(largest, 4 * down[1] * part_height)
    assert dict(plan.estimates)["streaming"] == RUNTIME_OVERHEAD_BYTES + factors + 4 * largest
