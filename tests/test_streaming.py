"""Streaming fuse executor: the same checkpoint as the diffusers pipeline route, in bounded memory.

float32: bit-identical to the pipeline route (``run_plan``) for tiny SD/SDXL, PEFT/kohya LoRAs, text
encoders, per-block weights, components, lora_scale, merges of every type (DARE: same draws), folder
and single-file outputs and bases, float32 -> float16 saves. float16/bfloat16: half an ulp from the
exact value, ≤ 2 ulps from the pipeline route. Also: independent math, canonical bytes, memory bound.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorarecipe.builtin.materialize import builtin_base_path, builtin_lora_path
from lorarecipe.compiler import compile_recipe
from lorarecipe.errors import BuildError
from lorarecipe.outputs.safetensors_meta import canonicalize_header, read_metadata
from lorarecipe.plan import LoadAdapter, Plan, SaveCheckpoint
from lorarecipe.recipe.load import load_recipe
from lorarecipe.runner import run_plan
from lorarecipe.runner.inputs import resolve_adapter, resolve_base, resolve_config
from lorarecipe.runner.records import provenance
from lorarecipe.runner.streaming import tensors as streaming_tensors
from lorarecipe.runner.streaming import writer as streaming_write
from lorarecipe.runner.streaming.stream import StreamReport, stream_fuse
from tests.helpers.lora_math import expected_fused, lora_deltas, read_component_weights
from tests.helpers.recipes import write_recipe

REPO = Path(__file__).resolve().parents[1]


def _stream(folder: Path, plan: Plan, text: str, out: str = "stream") -> dict[str, StreamReport]:
    """stream_fuse every checkpoint output of ``plan`` into ``folder/out``."""
    base = plan.step("base")
    base_path = resolve_base(base.source, folder, single_file=base.single_file).path  # type: ignore[attr-defined]
    config = resolve_config(base.config, folder)  # type: ignore[attr-defined]
    paths = {s.name: resolve_adapter(s.source, folder).path for s in plan.of_type(LoadAdapter)}
    meta = provenance(plan, text)
    reports = {}
    for save in plan.of_type(SaveCheckpoint):
        final, stamp = folder / out / save.path, {**meta, "lorarecipe.output": save.output}
        reports[save.output] = stream_fuse(
            plan,
            save,
            base_path=base_path,
            config_path=config,
            adapter_paths=paths,
            final=final,
            metadata=stamp,
        )
    return reports


def _both(folder: Path, text: str, identical: bool = True) -> dict[str, StreamReport]:
    """Build ``text`` with the pipeline route into folder/pipe and with the stream into folder/stream;
    unless ``identical`` is False, every output tensor must be bit-identical between the two."""
    loaded = load_recipe(write_recipe(folder, textwrap.dedent(text)))
    plan = compile_recipe(loaded)
    run_plan(
        plan, out_root=folder / "pipe", recipe_root=loaded.root, recipe_text=loaded.text, executor="diffusers"
    )
    reports = _stream(folder, plan, loaded.text)
    if identical:
        _assert_identical(folder, plan)
    return reports


def _files(path: Path) -> list[Path]:
    return sorted(p.relative_to(path) for p in path.rglob("*.safetensors")) if path.is_dir() else [Path()]


def _assert_identical(folder: Path, plan: Plan) -> None:
    """Every checkpoint output: same files, keys, dtypes and bit-identical tensors in both routes."""
    for save in plan.of_type(SaveCheckpoint):
        a, b = folder / "pipe" / save.path, folder / "stream" / save.path
        assert _files(a) == _files(b)
        for rel in _files(a):
            x, y = load_file(str(a / rel)), load_file(str(b / rel))
            assert x.keys() == y.keys(), f"{rel}: {sorted(set(x) ^ set(y))[:5]}"
            differ = [k for k in x if x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k])]
            assert not differ, f"{save.output}/{rel}: {len(differ)} tensors differ: {differ[:5]}"


def test_sd_peft_kohya_text_encoder_per_block_single_file(tmp_path: Path) -> None:
    reports = _both(
        tmp_path,
        """\
        base: builtin:tiny-sd
        adapters: {a: {builtin: tiny-sd/style}, b: {builtin: tiny-sd/detail}}
        set_adapters:
          adapters:
            a: {unet: {down: 0.3, mid: 1.5, up: {block_1: [0.5, -1.0]}}, text_encoder: 0.6}
            b: -0.4
        fuse: {lora_scale: 0.8}
        outputs:
          fused: {kind: pipeline, path: fused}
          single: {kind: single_file, path: single.safetensors}
          half: {kind: single_file, path: half.safetensors, dtype: float16}
        """,
    )
    base = builtin_base_path("tiny-sd")
    changed = sum(
        not torch.equal(t, read_component_weights(base, c)[k])
        for c in ("unet", "text_encoder")
        for k, t in read_component_weights(tmp_path / "stream" / "fused", c).items()
    )
    assert reports["fused"].changed == changed > 0
    assert reports["fused"].tensors == 396 and reports["fused"].max_abs_diff_vs_fp32 == 0.0
    assert 0 < reports["half"].max_abs_diff_vs_fp32 < 1e-3  # type: ignore[operator]


def test_sdxl_merges_of_every_svd_type_and_cat(tmp_path: Path) -> None:
    """Unequal ranks (r4 PEFT + r8 kohya): cat and the *_svd types; DARE draws match for the seed."""
    _both(
        tmp_path,
        """\
        base: builtin:tiny-sdxl
        adapters: {a: {builtin: tiny-sdxl/style}, b: {builtin: tiny-sdxl/detail}}
        merges:
          m_cat: {method: cat, adapters: {a: 0.6, b: 0.9}}
          m_svd: {method: svd, adapters: {a: 0.6, b: 0.9}, components: [text_encoder_2], svd_rank: 6}
          m_ts: {method: ties_svd, adapters: {a: 0.6, b: -0.9}, density: 0.5, components: [text_encoder]}
          m_dls: {method: dare_linear_svd, adapters: [a, b], density: 0.5, seed: 3, components: [text_encoder]}
          m_dts: {method: dare_ties_svd, adapters: [a, b], density: 0.6, seed: 4, components: [text_encoder_2]}
          m_mps: {method: magnitude_prune_svd, adapters: [a, b], density: 0.5, components: [text_encoder]}
        set_adapters: {adapters: {m_cat: 0.5, m_svd: 0.3, m_ts: 0.2, m_dls: 0.7, m_dts: -0.4, m_mps: 0.6, b: 0.25}}
        fuse: {lora_scale: 0.9}
        outputs: {fused: {kind: pipeline, path: fused}}
        """,
    )


def test_sd_equal_rank_merges_nested_components_subset(tmp_path: Path) -> None:
    """linear, ties, dare_linear, dare_ties, magnitude_prune and a cat of merges; UNet only."""
    reports = _both(
        tmp_path,
        """\
        base: builtin:tiny-sd
        adapters: {a: {builtin: tiny-sd/style}, b: {builtin: tiny-sd/pixel}, c: {builtin: tiny-sd/toy}}
        merges:
          m_lin: {method: linear, adapters: {a: 0.6, b: 0.9}}
          m_ties: {method: ties, adapters: {a: 0.6, b: 0.9}, density: 0.5}
          m_dl: {method: dare_linear, adapters: {a: 0.6, b: 0.9}, density: 0.5, seed: 7}
          m_dt: {method: dare_ties, adapters: {a: 0.6, c: 0.9}, density: 0.5, majority_sign_method: frequency,
                 components: [unet]}  # c is UNet-only: a lone 'a' in the text encoder would be refused
          m_mp: {method: magnitude_prune, adapters: {a: 0.6, b: -0.9}, density: 0.5}
          m_nest: {method: cat, adapters: {m_lin: 0.5, m_dt: 0.7}}
        set_adapters: {adapters: {m_nest: 0.5, m_ties: 0.3, m_dl: 0.2, m_mp: {unet: {mid: 0.5, down: 0.0}}}}
        fuse:
          lora_scale: 1.3
          components: [unet]
        outputs:
          fused: {kind: pipeline, path: fused}
          single: {kind: single_file, path: single.safetensors}
        """,
    )
    te = read_component_weights(tmp_path / "stream" / "fused", "text_encoder")
    base_te = read_component_weights(builtin_base_path("tiny-sd"), "text_encoder")
    assert all(torch.equal(te[k], base_te[k]) for k in base_te)  # not in the fused components
    assert reports["fused"].changed > 0


def _spacing(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The distance between adjacent ``dtype`` values at ``magnitude`` (one ulp), in float64."""
    big = magnitude.to(dtype)
    return (torch.nextafter(big, torch.full_like(big, float("inf"))) - big).double()


@pytest.mark.parametrize(("dtype", "chunk"), [("float16", None), ("bfloat16", None), ("float16", 64)])
def test_half_precision_base_rounds_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, chunk: int | None
) -> None:
    """A half-precision base with LoRA files in the same dtype (as published LoRAs are): the stream
    is within half an ulp of the exact float64 result (it sums in float32 and rounds once); the
    pipeline route rounds each adapter's delta and each partial sum, so the two differ by at most
    2 ulps of the largest operand (W, a delta, a partial sum). With float32 LoRA files the pipeline
    route also rounds the LoRA factors to the base dtype, which cancellation can amplify."""
    from diffusers import StableDiffusionPipeline

    chunked: list[bool] = []
    if chunk is not None:  # every tensor through the row-chunk path (real models: those > 4M elements)
        monkeypatch.setattr(streaming_tensors, "_CHUNK_ELEMENTS", chunk)
        original = streaming_write.write_chunked
        monkeypatch.setattr(
            streaming_write, "write_chunked", lambda *a: chunked.append(original(*a)) or chunked[-1]
        )
    half = getattr(torch, dtype)
    pipe = StableDiffusionPipeline.from_pretrained(str(builtin_base_path("tiny-sd")), dtype=half)
    pipe.save_pretrained(tmp_path / "base")
    for name in ("style", "detail"):
        source = builtin_lora_path(f"tiny-sd/{name}")
        tensors = {k: v if k.endswith(".alpha") else v.to(half) for k, v in load_file(str(source)).items()}
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=read_metadata(source))
    weights = {"style": 0.9 * 0.8, "detail": 0.7 * 0.8}  # set_adapters weight × lora_scale
    _both(
        tmp_path,
        """\
        base: {path: base}
        adapters:
          a: {file: style.safetensors}
          b: {file: detail.safetensors}
        set_adapters: {adapters: {a: 0.9, b: 0.7}}
        fuse: {lora_scale: 0.8}
        outputs: {fused: {kind: pipeline, path: fused}}
        """,
        identical=False,
    )
    components = ("unet", "text_encoder")
    base = {c: read_component_weights(tmp_path / "base", c) for c in components}
    deltas = {n: lora_deltas(tmp_path / f"{n}.safetensors", base) for n in weights}
    largest = worst_pipe = worst_stream = 0.0
    for comp in components:
        ours = read_component_weights(tmp_path / "stream" / "fused", comp)
        theirs = read_component_weights(tmp_path / "pipe" / "fused", comp)
        for key, tensor in ours.items():
            assert tensor.dtype == half
            w = base[comp][key].double()
            d1, d2 = (weights[n] * deltas[n].get((comp, key), torch.zeros_like(w)) for n in weights)
            if not (d1.any() or d2.any()):
                assert torch.equal(tensor, theirs[key]) and torch.equal(tensor, base[comp][key])
                continue
            x, y, exact = tensor.double(), theirs[key].double(), w + d1 + d2
            operands = torch.stack([w.abs(), d1.abs(), d2.abs(), (w + d1).abs(), x.abs(), y.abs()]).amax(0)
            float32_noise = 2**-20 * operands  # the stream sums W and the deltas in float32
            error = ((x - exact).abs() - float32_noise).clamp(min=0) / _spacing(x.abs(), half)
            worst_stream = max(worst_stream, float(error.max()))
            worst_pipe = max(worst_pipe, float(((x - y).abs() / _spacing(operands, half)).max()))
            largest = max(largest, float((x - y).abs().max()))
    print(
        f"{dtype}: |stream - pipeline| ≤ {largest:.3g} = {worst_pipe} ulp; stream vs exact ≤ {worst_stream:.3f} ulp"
    )
    assert worst_stream <= 0.5 + 1e-3
    assert 0 < worst_pipe <= 2.0  # the routes do round differently, by at most 2 ulps
    assert any(chunked) == (chunk is not None)


def test_single_file_base_to_folder_and_single_file(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from lorarecipe.runner.pipeline.save import save_single_file

    shutil.copytree(builtin_base_path("tiny-sd"), tmp_path / "configs")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "configs"))
    save_single_file(pipe, "sd1", tmp_path / "base.safetensors", {})
    reports = _both(
        tmp_path,
        """\
        base: {file: base.safetensors, config: configs, family: sd1}
        adapters: {a: {builtin: tiny-sd/style}, b: {builtin: tiny-sd/detail}}
        set_adapters: {adapters: {a: 0.7, b: 0.5}}
        fuse: {lora_scale: 0.9}
        outputs:
          fused: {kind: pipeline, path: fused}
          single: {kind: single_file, path: single.safetensors}
        """,
    )
    assert (tmp_path / "stream" / "fused" / "tokenizer" / "tokenizer.json").is_file()
    assert reports["single"].factors_cached  # the second output reuses the first one's factors


def test_independent_math_and_canonical_bytes(tmp_path: Path) -> None:
    """W + s·Σ wᵢ·(αᵢ/rᵢ)·BᵢAᵢ (float64 from the files) on tiny SDXL; rebuilds give identical bytes."""
    text = textwrap.dedent(
        """\
        base: builtin:tiny-sdxl
        adapters: {a: {builtin: tiny-sdxl/style}, b: {builtin: tiny-sdxl/detail}}
        set_adapters: {adapters: {a: 0.7, b: -0.4}}
        fuse: {lora_scale: 0.8}
        outputs: {fused: {kind: pipeline, path: fused}}
        """
    )
    plan = compile_recipe(load_recipe(write_recipe(tmp_path, text)))
    _stream(tmp_path, plan, text, out="one")
    _stream(tmp_path, plan, text, out="two")
    components = ("unet", "text_encoder", "text_encoder_2")
    base_dir = builtin_base_path("tiny-sdxl")
    base = {c: read_component_weights(base_dir, c) for c in components}
    loras = [(builtin_lora_path("tiny-sdxl/style"), 0.7), (builtin_lora_path("tiny-sdxl/detail"), -0.4)]
    expected = expected_fused(base, loras, 0.8)
    for comp in components:
        for key, tensor in read_component_weights(tmp_path / "one" / "fused", comp).items():
            if (comp, key) in expected:
                assert (tensor.double() - expected[(comp, key)]).abs().max().item() <= 1e-6
            else:
                assert torch.equal(tensor, base[comp][key]), f"{comp}.{key} changed"
    for rel in _files(tmp_path / "one" / "fused"):
        one, two = tmp_path / "one" / "fused" / rel, tmp_path / "two" / "fused" / rel
        assert one.read_bytes() == two.read_bytes()
        canonicalize_header(two)
        assert one.read_bytes() == two.read_bytes()  # already canonical
        assert read_metadata(one)["lorarecipe.fingerprint"] == plan.fingerprint()
    index = json.loads((tmp_path / "one" / "fused" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"


def test_refusals(tmp_path: Path) -> None:
    text = "base: builtin:tiny-sd\nadapters: {c: {builtin: tiny-sd/toy}}\nfuse:\n  adapters: [c]\n  components: [text_encoder]\noutputs: {f: {kind: pipeline, path: f}}\n"
    plan = compile_recipe(load_recipe(write_recipe(tmp_path, text)))
    with pytest.raises(BuildError, match="nothing to fuse"):
        _stream(tmp_path, plan, text)
    assert not (tmp_path / "stream" / "f").exists()
    overflow = (
        text.replace("  components: [text_encoder]\n", "")
        .replace("path: f}}", "path: f, dtype: float16}}")
        .replace("fuse:\n", "set_adapters:\n  adapters: {c: 1.0e+6}\nfuse:\n")
    )
    plan = compile_recipe(load_recipe(write_recipe(tmp_path, overflow)))
    with pytest.raises(BuildError, match="overflows float16"):  # float16 cannot hold the fused weights
        _stream(tmp_path, plan, overflow)
    assert not (tmp_path / "stream" / "f").exists()


_MEMORY_CHILD = """
import json, sys
from pathlib import Path
from lorarecipe.compiler import compile_recipe
from lorarecipe.recipe.load import load_recipe
from lorarecipe.plan import LoadAdapter, SaveCheckpoint
from lorarecipe.runner.streaming.stream import peak_rss_bytes, stream_fuse
recipe = Path(sys.argv[1])
plan = compile_recipe(load_recipe(recipe))
paths = {s.name: Path(sys.argv[2]) for s in plan.of_type(LoadAdapter)}
save = plan.of_type(SaveCheckpoint)[0]
stream_fuse(plan, save, base_path=Path(sys.argv[3]), config_path=None, adapter_paths=paths,
            final=recipe.parent / "warm-up", metadata={})  # the tiny base: imports, first-use caches
try:  # Linux: reset the peak-RSS mark to the current RSS, so the peak below is this stream's own
    Path("/proc/self/clear_refs").write_text("5")
except OSError:
    pass
before = peak_rss_bytes()
report = stream_fuse(plan, save, base_path=recipe.parent / "base", config_path=None,
                     adapter_paths=paths, final=recipe.parent / "out", metadata={})
print(json.dumps({"before": before, "after": report.peak_rss_bytes, "tensors": report.tensors}))
"""


def test_peak_memory_is_bounded_by_the_largest_tensor(tmp_path: Path) -> None:
    """A 400 MB base, every tensor converted (float32 -> float16, the compute path): RSS grows by a few
    copies of the largest tensor (16 MiB), not by the checkpoint."""
    base = tmp_path / "base"
    shutil.copytree(builtin_base_path("tiny-sd"), base)
    unet_file = base / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(unet_file))
    generator = torch.Generator().manual_seed(0)
    for i in range(24):
        tensors[f"zz_padding.{i:02d}.weight"] = torch.randn(4100, 1024, generator=generator)
    save_file(tensors, str(unet_file))
    largest = 4100 * 1024 * 4
    del tensors
    recipe = write_recipe(
        tmp_path,
        "base: {path: base}\nadapters:\n  a: {file: a.safetensors}\nfuse:\n  adapters: [a]\n"
        "outputs:\n  f: {kind: pipeline, path: out, dtype: float16}\n",
    )
    shutil.copyfile(builtin_lora_path("tiny-sd/style"), tmp_path / "a.safetensors")
    args = [str(recipe), str(tmp_path / "a.safetensors"), str(builtin_base_path("tiny-sd"))]
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, *args], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    usage: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    growth = usage["after"] - usage["before"]
    total = sum(f.stat().st_size for f in base.rglob("*.safetensors"))
    print(
        f"base {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, peak RSS "
        f"{usage['before'] / 2**20:.0f} -> {usage['after'] / 2**20:.0f} MiB during the stream"
    )
    assert total > 350 * 2**20
    assert growth < 4 * largest, f"peak RSS grew by {growth / 2**20:.1f} MiB"


def test_row_chunks_give_the_whole_tensor_deltas() -> None:
    """The chunked path's delta rows (lora_B rows @ lora_A, 64-row blocks) equal the whole-tensor
    delta bit for bit, for a Linear and a 1×1 Conv2d at SD sizes."""
    from peft import LoraConfig, inject_adapter_in_model

    from lorarecipe.runner.fuse_math import FuseTarget, FuseTerm, fused_weight
    from lorarecipe.runner.streaming.factors import factors_from_model

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"ff": torch.nn.Linear(1280, 10240), "proj": torch.nn.Conv2d(1280, 1280, 1)})
    config = LoraConfig(r=32, lora_alpha=16, target_modules=["ff", "proj"], init_lora_weights=False)
    inject_adapter_in_model(config, model, adapter_name="a")
    for name in ("ff", "proj"):
        layer = model[name]
        layer.set_scale("a", 0.7)
        factor = factors_from_model("unet", model, ["a"])["a"][("unet", name)]
        target = FuseTarget("unet", name, (FuseTerm("a", factor, layer.scaling["a"]),))
        base = torch.randn(layer.get_base_layer().weight.shape)
        step = streaming_tensors.chunk_rows(base[0].numel())
        with torch.no_grad():
            whole = fused_weight(base, target)
            rows = [
                fused_weight(base[i : i + step], target, (i, i + step)) for i in range(0, base.shape[0], step)
            ]
        assert torch.equal(torch.cat(rows), whole), name


def test_light_import_and_lora_mixin_table() -> None:
    """Copying starts before the heavy imports, so the module must not pull them in; the table of
    LoRA mixins (which spares importing the pipeline modules) must match the classes' MROs."""
    import diffusers

    from lorarecipe.runner.streaming.skeleton import LORA_MIXINS, lora_mixin

    code = "import sys, lorarecipe.runner.streaming.stream; print([m for m in ('torch', 'peft') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "[]", result.stderr
    for pipeline, mixin in LORA_MIXINS.items():
        assert lora_mixin(pipeline).__name__ == mixin
        assert lora_mixin(pipeline) in getattr(diffusers, pipeline).__mro__


def test_streamed_files_are_hashed_while_written_not_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest's sha256 of a streamed safetensors file comes from the stream (the file is not
    read again to hash it), and equals the file's real sha256 (verify)."""
    import hashlib

    from lorarecipe.cli import main
    from lorarecipe.outputs import manifest

    hashed: list[str] = []
    real = manifest.sha256_file

    def spy(path: Path, *, use_cache: bool = True) -> str:
        hashed.append(path.name)
        return real(path, use_cache=use_cache)

    monkeypatch.setattr(manifest, "sha256_file", spy)
    recipe = write_recipe(
        tmp_path,
        """\
base: builtin:tiny-sd
adapters:
  a: builtin:tiny-sd/style
fuse: {adapters: [a], lora_scale: 0.5}
outputs:
  fused: {kind: pipeline, path: fused, dtype: float16}
  ckpt: {kind: single_file, path: x.safetensors}
""",
    )
    assert main(["build", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert not [name for name in hashed if name.endswith(".safetensors")], hashed
    doc = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for output in doc["outputs"].values():
        for entry in output["files"]:
            data = (tmp_path / "out" / entry["path"]).read_bytes()
            assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["size"] == len(data)


@pytest.mark.parametrize("executor", ["streaming", "diffusers"])
def test_outputs_do_not_depend_on_the_thread_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, executor: str
) -> None:
    """Weights, LoRA files and single files are byte-identical with 1 and 2 torch threads (the
    thread count is recorded in the manifest, with where it came from)."""
    from lorarecipe.cli import main

    recipe = write_recipe(
        tmp_path,
        """\
base: builtin:tiny-sdxl
adapters:
  a: builtin:tiny-sdxl/style
  b: builtin:tiny-sdxl/detail
merges:
  m: {method: svd, adapters: {a: 0.7, b: 0.5}, svd_rank: 6}
set_adapters:
  adapters: {a: 0.8, m: -0.4}
fuse: {lora_scale: 0.9}
outputs:
  fused: {kind: pipeline, path: fused, card: false}
  half: {kind: pipeline, path: half, dtype: float16, card: false}
  lora: {kind: lora, adapter: m, path: lora, card: false}
""",
    )
    digests = []
    for threads in ("1", "2"):
        monkeypatch.setenv("LORARECIPE_CACHE", str(tmp_path / f"cache{threads}"))  # no shared factors
        out = tmp_path / f"out{threads}"
        argv = [
            "build",
            str(recipe),
            "--out",
            str(out),
            "--quiet",
            "--executor",
            executor,
            "--threads",
            threads,
        ]
        assert main(argv) == 0
        doc = json.loads((out / "manifest.json").read_text())
        assert doc["threads"]["torch_intra_op"] == int(threads) and doc["threads"]["source"] == "--threads"
        digests.append({p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.safetensors")})
    assert digests[0] == digests[1] and len(digests[0]) >= 7


def test_thread_policy_uses_the_available_cores_and_its_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from lorarecipe.errors import UsageError
    from lorarecipe.runner.device import thread_policy

    monkeypatch.delenv("LORARECIPE_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert (thread_policy().threads, thread_policy().source) == (3, "auto")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert thread_policy().threads == 1
    monkeypatch.setenv("LORARECIPE_THREADS", "5")
    assert (thread_policy().threads, thread_policy().source) == (5, "LORARECIPE_THREADS")
    assert (thread_policy(2).threads, thread_policy(2).source) == (2, "--threads")
    monkeypatch.setenv("LORARECIPE_THREADS", "zero")
    with pytest.raises(UsageError, match="LORARECIPE_THREADS"):
        thread_policy()
