"""Runner outputs behave like the diffusers/PEFT calls they stand for.

- a fused pipeline renders like the runtime ``set_adapters`` mix with ``scale=lora_scale``;
- a ``cat`` merge saved as a LoRA file (diffusers or kohya layout) renders like the runtime mix and
  holds exactly Σ wᵢ ΔWᵢ, even if set_adapters weights were set before merging;
- single files load with ``from_single_file`` into the same weights;
- two builds of one recipe give byte-identical files; DARE merges are reproducible by seed;
- the manifest verifies, and a tampered output is named.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.cli import main
from lorarecipe.errors import BuildError
from lorarecipe.plan import MergeAdapters
from tests.helpers.lora_math import lora_deltas, read_component_weights
from tests.helpers.recipes import build_text

RECIPE = """\
base: builtin:tiny-sd
adapters:
  style: builtin:tiny-sd/style
  detail: builtin:tiny-sd/detail
merges:
  both:
    method: cat
    adapters: {style: 0.7, detail: 0.5}
  dared:
    method: dare_linear
    adapters: [style, pixel]
    density: 0.5
    seed: 7
set_adapters:
  adapters: {style: 0.7, detail: 0.5}
fuse:
  lora_scale: 0.8
outputs:
  fused: {kind: pipeline, path: fused}
  ckpt: {kind: single_file, path: fused.safetensors}
  merged: {kind: lora, adapter: both, path: merged}
  merged-kohya: {kind: lora, adapter: both, path: merged-kohya, layout: kohya}
  dare: {kind: lora, adapter: dared, path: dare}
"""
RECIPE = RECIPE.replace(
    "  detail: builtin:tiny-sd/detail\n", "  detail: builtin:tiny-sd/detail\n  pixel: builtin:tiny-sd/pixel\n"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("outputs")
    build_text(folder, RECIPE)
    return folder / "out"


def _pipe(path: Path | None = None) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path or builtin_base_path("tiny-sd")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe: Any, **kwargs: Any) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(3)
    return np.asarray(
        pipe(
            "a photo of a cat", num_inference_steps=3, generator=generator, output_type="np", **kwargs
        ).images[0]
    )


def test_fused_pipeline_renders_like_the_runtime_mix(built: Path) -> None:
    fused = _image(_pipe(built / "fused"))
    runtime = _pipe()
    runtime.load_lora_weights(str(builtin_lora_path("tiny-sd/style")), adapter_name="style")
    runtime.load_lora_weights(str(builtin_lora_path("tiny-sd/detail")), adapter_name="detail")
    runtime.set_adapters(["style", "detail"], adapter_weights=[0.7, 0.5])
    mixed = _image(runtime, cross_attention_kwargs={"scale": 0.8})
    runtime.disable_lora()
    base = _image(runtime)
    assert np.abs(fused - mixed).max() <= 1e-3
    assert np.abs(fused - base).max() > 1e-2  # the LoRAs do change the picture


def test_cat_merge_file_is_the_exact_weighted_sum(built: Path) -> None:
    base = {c: read_component_weights(builtin_base_path("tiny-sd"), c) for c in ("unet", "text_encoder")}
    style = lora_deltas(builtin_lora_path("tiny-sd/style"), base)
    detail = lora_deltas(builtin_lora_path("tiny-sd/detail"), base)
    expected = {k: 0.7 * style.get(k, 0) + 0.5 * detail.get(k, 0) for k in {*style, *detail}}
    for folder, name in (
        ("merged", "pytorch_lora_weights.safetensors"),
        ("merged-kohya", "both.safetensors"),
    ):
        got = lora_deltas(built / folder / name, base)
        assert got.keys() == expected.keys()
        worst = max((got[k] - expected[k]).abs().max().item() for k in got)
        assert worst <= 1e-6, (folder, worst)


def test_merged_lora_file_renders_like_the_runtime_mix(built: Path) -> None:
    for folder, name in (
        ("merged", "pytorch_lora_weights.safetensors"),
        ("merged-kohya", "both.safetensors"),
    ):
        pipe = _pipe()
        pipe.load_lora_weights(str(built / folder / name), adapter_name="merged")
        merged = _image(pipe)
        runtime = _pipe()
        runtime.load_lora_weights(str(builtin_lora_path("tiny-sd/style")), adapter_name="style")
        runtime.load_lora_weights(str(builtin_lora_path("tiny-sd/detail")), adapter_name="detail")
        runtime.set_adapters(["style", "detail"], adapter_weights=[0.7, 0.5])
        assert np.abs(merged - _image(runtime)).max() <= 1e-3, folder


def test_single_file_loads_into_the_fused_weights(built: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(built / "fused.safetensors"), config=str(built / "fused"), local_files_only=True
    )
    for comp in ("unet", "vae", "text_encoder"):
        saved = read_component_weights(built / "fused", comp)
        loaded = getattr(pipe, comp).state_dict()
        for key, tensor in saved.items():
            assert torch.equal(loaded[key], tensor), f"{comp}.{key}"


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.name != "manifest.json"
        and not p.relative_to(folder).parts[0].startswith(".lorarecipe")
    }


def test_two_builds_are_byte_identical(built: Path) -> None:
    build_text(built.parent, RECIPE, out="again")  # the same recipe file, another output root
    first, second = _hashes(built), _hashes(built.parent / "again")
    assert first == second
    assert any(name.endswith(".safetensors") for name in first)


def test_dare_merge_depends_only_on_its_seed(built: Path, tmp_path: Path) -> None:
    build_text(tmp_path, RECIPE.replace("seed: 7", "seed: 8"))
    name = "dare/pytorch_lora_weights.safetensors"
    assert _hashes(built)[name] != _hashes(tmp_path / "out")[name]


def test_outputs_carry_provenance(built: Path) -> None:
    from lorarecipe.outputs.safetensors_meta import read_metadata

    manifest = json.loads((built / "manifest.json").read_text())
    for path in [
        built / "fused.safetensors",
        built / "merged" / "pytorch_lora_weights.safetensors",
        built / "fused" / "unet" / "diffusion_pytorch_model.safetensors",
    ]:
        meta = read_metadata(path)
        assert meta["lorarecipe.fingerprint"] == manifest["fingerprint"]
        assert "merges:" in meta["lorarecipe.recipe"]
    assert {i["step"] for i in manifest["inputs"]} == {
        "base",
        "adapter:style",
        "adapter:detail",
        "adapter:pixel",
    }
    assert all(f["sha256"] and f["size"] for i in manifest["inputs"] for f in i["files"])
    assert manifest["seeds"]["merge:dared"] == 7


def test_verify_names_changed_and_missing_files(
    built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    assert main(["verify", str(copy)]) == 0
    (copy / "merged" / "pytorch_lora_weights.safetensors").write_bytes(b"tampered")
    (copy / "fused.safetensors").unlink()
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "merged/pytorch_lora_weights.safetensors: changed" in err
    assert "fused.safetensors: missing" in err


def test_merge_resets_set_adapters_weights_and_refuses_taken_names() -> None:
    from lorarecipe.runner.pipeline.merge import merge_adapters

    pipe = _pipe()
    pipe.load_lora_weights(str(builtin_lora_path("tiny-sd/style")), adapter_name="style")
    pipe.load_lora_weights(str(builtin_lora_path("tiny-sd/toy")), adapter_name="toy")
    pipe.set_adapters(["style", "toy"], adapter_weights=[0.3, 0.2])  # would leak into PEFT's merge
    step = MergeAdapters(id="merge:m", name="m", method="cat", adapters=("style", "toy"), weights=(1.0, 1.0))
    assert merge_adapters(pipe, step) == ["unet", "text_encoder"]
    module = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    merged = module.get_delta_weight("m")
    pipe.set_adapters(["style", "toy"], adapter_weights=[1.0, 1.0])
    expected = module.get_delta_weight("style") + module.get_delta_weight("toy")
    assert (merged - expected).abs().max().item() <= 1e-6
    with pytest.raises(BuildError, match="already exists"):
        merge_adapters(pipe, step)


def test_single_file_base_builds_like_its_folder(built: Path) -> None:
    """A single-file base (from_single_file + local configs) fuses into the same weights as its folder."""
    folder = built.parent
    text = """\
base: {file: out/fused.safetensors, config: out/fused, family: sd1}
adapters:
  toy: builtin:tiny-sd/toy
fuse: {adapters: [toy], lora_scale: 1.0}
outputs:
  again: {kind: pipeline, path: again}
"""
    build_text(folder, text, out="from-single", name="single.yaml")
    base = {"unet": read_component_weights(built / "fused", "unet")}
    expected = {key: value for key, value in lora_deltas(builtin_lora_path("tiny-sd/toy"), base).items()}
    fused = read_component_weights(folder / "from-single" / "again", "unet")
    for key, tensor in base["unet"].items():
        want = tensor.double() + expected[("unet", key)] if ("unet", key) in expected else tensor.double()
        assert (fused[key].double() - want).abs().max().item() <= 1e-6, key
