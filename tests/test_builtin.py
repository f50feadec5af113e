"""The built-in tiny family: deterministic offline materialization, loadable pipelines with a real
tokenizer, LoRA files whose loaded values equal an independent reading of the file, and the committed
inventory staying in sync."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from lorarecipe.builtin import BUILTIN_BASES, BUILTIN_LORAS, BUILTIN_VERSION, builtin_inventory
from lorarecipe.builtin.loras import make_kohya_lora, make_peft_lora
from lorarecipe.builtin.materialize import (
    build_base_pipeline,
    builtin_base_path,
    builtin_lora_path,
    generate_inventory,
    materialize_all,
    read_safetensors_header,
)
from lorarecipe.builtin.tokenizer import DEFAULT_WORDS
from lorarecipe.errors import InputUnavailableError
from lorarecipe.families import FAMILIES

REPO = Path(__file__).resolve().parents[1]
INVENTORY = REPO / "lorarecipe" / "builtin" / "inventory.json"
TE_COMPONENTS = ("text_encoder", "text_encoder_2")


def _no_network(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("the built-in family must never touch the network")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every built-in materialized once in a fresh cache, with sockets disabled."""
    root = tmp_path_factory.mktemp("lorarecipe-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORARECIPE_CACHE", str(root))
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "getaddrinfo", _no_network)
        materialize_all()
        yield root


@pytest.fixture()
def use_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORARECIPE_CACHE", str(cache))
    return cache


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


_CHILD = textwrap.dedent(
    """
    import socket
    def refuse(*a, **k):
        raise AssertionError("network access")
    socket.socket.connect = refuse
    socket.getaddrinfo = refuse
    from lorarecipe.builtin.materialize import materialize_all
    materialize_all()
    """
)


@pytest.mark.slow
def test_materialization_is_byte_identical_across_processes(cache: Path, tmp_path: Path) -> None:
    """Two concurrent processes (different hash seeds) building into one fresh cache produce the same
    bytes as the in-process build: deterministic, race-free, offline."""
    other = tmp_path / "cache"
    procs = []
    for seed in ("1", "2"):
        env = {
            **os.environ,
            "LORARECIPE_CACHE": str(other),
            "PYTHONHASHSEED": seed,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _CHILD],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-3000:]
    first, second = _digests(cache), _digests(other)
    assert len(first) > 20
    assert first == second
    assert not [p for p in other.rglob("*") if ".lorarecipe-tmp-" in p.name]


def test_in_memory_build_is_deterministic_and_keeps_rng() -> None:
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    one, two = (
        build_base_pipeline("tiny-sd").unet.state_dict(),
        build_base_pipeline("tiny-sd").unet.state_dict(),
    )
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize(
    ("name", "cls"), [("tiny-sd", StableDiffusionPipeline), ("tiny-sdxl", StableDiffusionXLPipeline)]
)
def test_base_loads_and_generates_with_a_real_tokenizer(cache: Path, name: str, cls: Any) -> None:
    pipe = DiffusionPipeline.from_pretrained(builtin_base_path_in(cache, name))
    assert type(pipe) is cls
    pipe.set_progress_bar_config(disable=True)
    for comp in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, comp, None)
        if tok is None:
            continue
        assert len(tok) > 100  # not the transformers-5 two-entry vocabulary trap
        ids = [tok(word, add_special_tokens=False).input_ids for word in ("cat", "dog", "photo", "castle")]
        assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 4
        assert tok.eos_token_id not in {i[0] for i in ids}
        assert len(tok(" ".join(DEFAULT_WORDS), add_special_tokens=False).input_ids) == len(DEFAULT_WORDS)

    def run(prompt: str) -> np.ndarray:
        out = pipe(
            prompt,
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
        image: np.ndarray = out.images
        return image

    cat, dog = run("a photo of a cat"), run("a painting of a dog")
    assert cat.shape == (1, 64, 64, 3) and np.isfinite(cat).all()
    assert not np.array_equal(cat, dog)  # the prompt reaches the UNet


def builtin_base_path_in(cache: Path, name: str) -> Path:
    """``builtin_base_path`` under the fixture's cache, whatever a per-test fixture did to the env."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORARECIPE_CACHE", str(cache))
        return builtin_base_path(name)


def _file_deltas(path: Path, pipe: DiffusionPipeline) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module) -> (alpha/rank) · up @ down, read from the file without diffusers' converters."""
    sd = load_file(str(path))
    header = read_safetensors_header(path).get("__metadata__", {})
    deltas: dict[tuple[str, str], torch.Tensor] = {}
    if any(k.endswith(".lora_A.weight") for k in sd):  # PEFT layout
        meta = json.loads(header["lora_adapter_metadata"])
        for key in sd:
            if key.endswith(".lora_A.weight"):
                comp, module = key[: -len(".lora_A.weight")].split(".", 1)
                down, up = sd[key], sd[key.replace(".lora_A.", ".lora_B.")]
                scale = meta[f"{comp}.lora_alpha"] / meta[f"{comp}.r"]
                deltas[(comp, module)] = scale * (up.flatten(1) @ down.flatten(1))
        return deltas
    # kohya layout: map every module of the pipeline to its kohya prefix by hand
    two = getattr(pipe, "text_encoder_2", None) is not None
    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if two else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    by_prefix = {}
    for comp, prefix in prefixes.items():
        model = getattr(pipe, comp, None)
        if model is not None:
            for module, _ in model.named_modules():
                # real-world TE keys spell "text_model_" once, whether or not the transformers module has it
                kohya = (
                    module if comp == "unet" or module.startswith("text_model.") else f"text_model.{module}"
                )
                by_prefix[prefix + kohya.replace(".", "_")] = (comp, module)
    for key in sd:
        if key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            down, up = sd[key], sd[f"{stem}.lora_up.weight"]
            scale = float(sd[f"{stem}.alpha"]) / down.shape[0]
            deltas[by_prefix[stem]] = scale * (up.flatten(1) @ down.flatten(1))
    return deltas


def _loaded_deltas(pipe: DiffusionPipeline, adapter: str) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module) -> scaling · B @ A of ``adapter`` as injected by diffusers/peft."""
    out = {}
    for comp in ("unet", *TE_COMPONENTS):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                out[(comp, name)] = module.scaling[adapter] * (b.flatten(1) @ a.flatten(1))
    return out


# UNet bases, loaded through diffusers alone; the DiT built-ins' original-layout LoRAs go through lorarecipe's
# converter (diffusers' hard-codes FLUX.1-dev widths, drops FLUX.2 modules, fails on musubi Wan files with
# embedders): tests/test_flux_loras.py checks FLUX.1's the same way, tests/test_dit_families.py Qwen-Image's,
# Z-Image's and SD 3's, tests/test_dit_conversion.py and tests/test_dit_fuse.py FLUX.2's and Wan's.
@pytest.mark.parametrize(
    "base", [b for b, spec in BUILTIN_BASES.items() if FAMILIES[spec.family].denoiser == "unet"]
)
def test_builtin_loras_load_with_exact_values(cache: Path, base: str) -> None:
    pipe = DiffusionPipeline.from_pretrained(builtin_base_path_in(cache, base))
    loras = [spec for spec in BUILTIN_LORAS.values() if spec.base == base]
    paths = {
        spec.name: cache / "builtin" / f"v{BUILTIN_VERSION}" / "loras" / f"{spec.name}.safetensors"
        for spec in loras
    }
    for spec in loras:
        pipe.load_lora_weights(str(paths[spec.name]), adapter_name="lr_" + spec.name.replace("/", "__"))
    saw_conv = False
    for spec in loras:  # checked after all loads: later adapters must not disturb earlier ones
        expected = _file_deltas(paths[spec.name], pipe)
        loaded = _loaded_deltas(pipe, "lr_" + spec.name.replace("/", "__"))
        assert set(loaded) == set(expected), spec.name  # no key silently dropped or added
        for key, delta in expected.items():
            torch.testing.assert_close(loaded[key], delta, atol=1e-6, rtol=0, msg=f"{spec.name} {key}")
        comps = {comp for comp, _ in expected}
        assert comps == (
            {"unet", "text_encoder", "text_encoder_2"} & set(pipe.components)
            if spec.text_encoders
            else {"unet"}
        ), spec.name
        ranks = {
            t.shape[0]
            for k, t in load_file(str(paths[spec.name])).items()
            if k.endswith(("lora_A.weight", "down.weight"))
        }
        assert ranks == {spec.rank}
        if spec.layout == "kohya" and base == "tiny-sd":
            proj = [m for c, m in expected if m.endswith("proj_in")]
            assert proj and all(pipe.unet.get_submodule(m).base_layer.kernel_size == (1, 1) for m in proj)
            saw_conv = True
    assert saw_conv or base != "tiny-sd"


def test_writers_leave_the_pipeline_unchanged(tmp_path: Path) -> None:
    pipe = build_base_pipeline("tiny-sd")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te_before = set(pipe.text_encoder.state_dict())
    make_peft_lora(pipe, tmp_path / "a.safetensors", rank=2, alpha=2.0, seed=0)
    make_kohya_lora(pipe, tmp_path / "b.safetensors", rank=2, alpha=1.0, seed=0, include_conv_proj=False)
    after = pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert set(pipe.text_encoder.state_dict()) == te_before
    assert getattr(pipe.unet, "peft_config", None) is None
    assert not any("proj_in" in k for k in load_file(str(tmp_path / "b.safetensors")))
    # an adapter already present stays present and active
    pipe.load_lora_weights(str(tmp_path / "a.safetensors"), adapter_name="lr_existing")
    make_peft_lora(pipe, tmp_path / "c.safetensors", rank=2, alpha=2.0, seed=1)
    assert list(pipe.unet.peft_config) == ["lr_existing"]
    assert pipe.get_active_adapters() == ["lr_existing"]


def test_inventory_is_in_sync(use_cache: Path) -> None:
    generated = generate_inventory()
    assert generated == json.loads(INVENTORY.read_text(encoding="utf-8")), (
        "run: python -m lorarecipe.builtin.materialize --inventory"
    )
    assert builtin_inventory() == generated
    assert set(generated["loras"]) == set(BUILTIN_LORAS)


def test_paths_are_cached_and_unknown_names_fail(use_cache: Path) -> None:
    base = builtin_base_path("tiny-sd")
    stamp = (base / "model_index.json").stat().st_mtime_ns
    assert builtin_base_path("tiny-sd") == base
    assert (base / "model_index.json").stat().st_mtime_ns == stamp
    assert builtin_lora_path("tiny-sd/style").is_file()
    with pytest.raises(InputUnavailableError, match="did you mean 'tiny-sdxl'"):
        builtin_base_path("tiny-sdx")
    with pytest.raises(InputUnavailableError, match="did you mean 'tiny-sd/style'"):
        builtin_lora_path("tiny-sd/styl")


def test_package_import_is_torch_free() -> None:
    code = "import sys, lorarecipe.builtin as b; assert b.BUILTIN_BASES; assert 'torch' not in sys.modules"
    env: dict[str, Any] = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
