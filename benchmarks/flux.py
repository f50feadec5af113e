"""Fuse two LoRAs into a full-size FLUX.1-dev transformer: ``lorarecipe build`` vs the diffusers flow.

    python benchmarks/flux.py [--work /work/bench/flux] [--blocks 19 38] [--skip-diffusers]

Builds once, in ``--work``, a FLUX.1-dev-architecture pipeline folder with random weights: the
transformer at full size (19 double + 38 single blocks, 11.9 B parameters, bfloat16, 23.8 GB in three
shards like the published one), written tensor by tensor from the meta device (it does not fit in
this machine's RAM), plus small text encoders and VAE of compatible widths (they carry no LoRA); and
two rank-32 kohya-layout LoRAs (BFL names, fused qkv and linear1) on every attention and MLP module
of both block kinds (r32/α16 at weight 0.8, r32/α32 at weight 0.5, lora_scale 0.7). Then, each in a
fresh process (peak RSS from ``os.wait4``, ``sync`` before each run; the machine is shared, so times
are upper bounds):

(b) ``python -m lorarecipe build`` of the recipe (streaming executor): a diffusers folder, then a BFL
    single file; first with an empty factor cache (diffusers/PEFT decide the targets on a weightless
    model), then with cached factors and other weights (what a user tuning weights runs);
(c) copying the base's transformer files with fsync: the I/O floor of (b);
(a) the diffusers flow from the guides: from_pretrained(bfloat16), load_lora_weights ×2,
    set_adapters, fuse_lora, unload_lora_weights, save_pretrained. It needs the whole pipeline in
    RAM; when the kernel kills it (its oom_score_adj is raised so that it, not another process, is
    chosen) the table says so with the memory it had reached.

and spot-checks (b): for a few fused tensors, W + 0.7·Σ wᵢ·(αᵢ/r)·BᵢAᵢ from the files (float64) is
within half a bfloat16 ulp of what was written. Prints a markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = (0.8, 0.5)
LORA_SCALE = 0.7
SHARD_BYTES = 10 * 1000**3  # diffusers' save_pretrained default shard size for FLUX.1-dev
RECIPE = """\
base: {{path: base}}
adapters:
  l1: {{file: lora1.safetensors}}
  l2: {{file: lora2.safetensors}}
set_adapters:
  adapters: {{l1: {w1}, l2: {w2}}}
fuse:
  lora_scale: {scale}
  components: [transformer]
outputs:
  {output}
"""
OUTPUTS = {
    "folder": "fused: {kind: pipeline, path: fused, card: false}",
    "single": "single: {kind: single_file, path: flux1-dev-fused.safetensors}",
}


# ------------------------------------------------------------------------------------------ the base


def _write_shards(model: Any, folder: Path) -> None:
    """A meta-device model -> bfloat16 safetensors shards + index, one tensor generated at a time."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(shapes):
        nbytes = 2 * int(torch.Size(shapes[key]).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for number, keys in enumerate(shards, start=1):
        name = f"diffusion_pytorch_model-{number:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key in keys:
            nbytes = 2 * int(torch.Size(shapes[key]).numel())
            header[key] = {
                "dtype": "BF16",
                "shape": list(shapes[key]),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / f"{name}.tmp", "wb") as handle:
            handle.write(struct.pack("<Q", len(text)) + text)
            for key in keys:
                values = torch.randn(shapes[key], generator=generator).mul_(0.02).to(torch.bfloat16)
                handle.write(values.view(torch.uint8).numpy().tobytes())
                weight_map[key] = name
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(folder / f"{name}.tmp", folder / name)
    index = {
        "metadata": {"total_size": sum(2 * torch.Size(s).numel() for s in shapes.values())},
        "weight_map": weight_map,
    }
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _build(work: Path) -> None:
    """Child: the base folder and the two LoRAs (skipped when present)."""
    from types import SimpleNamespace

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lorarecipe.builtin.flux_loras import make_flux_lora
    from lorarecipe.builtin.tokenizer import build_clip_tokenizer, build_t5_tokenizer

    base = work / "base"
    blocks = json.loads((work / "blocks.json").read_text())  # [19, 38]: FLUX.1-dev; fewer when disk is short
    with torch.device("meta"):  # FLUX.1-dev's configuration
        transformer = FluxTransformer2DModel(
            guidance_embeds=True, num_layers=blocks[0], num_single_layers=blocks[1]
        )
    if not (base / "model_index.json").is_file():
        tmp = work / "base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tok, tok_2 = build_clip_tokenizer(), build_t5_tokenizer()
        torch.manual_seed(0)
        clip = CLIPTextModel(  # pooled width 768, as CLIP-L; one layer
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=768,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        )
        t5 = T5EncoderModel(  # width 4096, as T5-XXL; one small layer
            T5Config(
                vocab_size=len(tok_2),
                d_model=4096,
                d_kv=16,
                d_ff=64,
                num_layers=1,
                num_heads=4,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 32, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=16,
            norm_num_groups=32,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.1159,
            scaling_factor=0.3611,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        small = FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=clip,
            tokenizer=tok,
            text_encoder_2=t5,
            tokenizer_2=tok_2,
            transformer=None,
        )  # type: ignore[arg-type]
        small.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        transformer.save_config(tmp / "transformer")
        _write_shards(transformer, tmp / "transformer")
        os.replace(tmp, base)
    attention_and_mlp = (
        "img_attn.qkv",
        "img_attn.proj",
        "img_mlp.",
        "txt_attn.qkv",
        "txt_attn.proj",
        "txt_mlp.",
        "linear1",
        "linear2",
    )
    for i, alpha in enumerate((16.0, 32.0), start=1):
        path = work / f"lora{i}.safetensors"
        if not path.is_file():
            make_flux_lora(
                SimpleNamespace(transformer=transformer),
                path,
                layout="kohya",
                rank=32,
                alpha=alpha,
                seed=10 + i,
                text_encoders=False,
                scale=0.05,
                dtype=torch.bfloat16,
                select=lambda name: any(p in name for p in attention_and_mlp),
            )


# ------------------------------------------------------------------------------------------- routes


def route_diffusers_flow(
    pipeline: str,
    base: Path,
    loras: Sequence[Path],
    out: Path,
    *,
    weights: Sequence[float],
    lora_scale: float,
    dtype: str = "bfloat16",
    components: list[str] | None = None,
    oom_first: bool = True,
) -> dict[str, float]:
    """The diffusers flow from the guides, timed in this process: ``diffusers.PIPELINE.from_pretrained``
    (``dtype``), ``load_lora_weights`` of each LoRA (adapters l1, l2, …), ``set_adapters(weights)``,
    ``fuse_lora`` (of ``components``; None: fuse_lora's default), ``unload_lora_weights``,
    ``save_pretrained`` -> seconds since the start at import, load, fuse and save. ``oom_first``: the
    kernel kills this process first when memory runs out, not a neighbour. Shared by the benchmarks'
    ``diffusers`` child routes."""
    if oom_first:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")
    started = time.perf_counter()
    import diffusers
    import torch

    pipeline_class = getattr(diffusers, pipeline)
    timings = {"import": time.perf_counter() - started}
    pipe = pipeline_class.from_pretrained(str(base), dtype=getattr(torch, dtype), local_files_only=True)
    timings["load"] = time.perf_counter() - started
    names = [f"l{i}" for i in range(1, len(loras) + 1)]
    for lora, name in zip(loras, names, strict=True):
        pipe.load_lora_weights(str(lora), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=list(weights))
    which = {} if components is None else {"components": components}
    pipe.fuse_lora(**which, lora_scale=lora_scale, adapter_names=names)
    pipe.unload_lora_weights()
    timings["fuse"] = time.perf_counter() - started
    pipe.save_pretrained(str(out), safe_serialization=True)
    timings["save"] = time.perf_counter() - started
    return timings


def _route_copy(work: Path, out: Path) -> dict[str, float]:
    started = time.perf_counter()
    for file in sorted((work / "base" / "transformer").iterdir()):
        target = out / file.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
        with open(target, "rb+") as handle:
            os.fsync(handle.fileno())
    return {"copy": time.perf_counter() - started}


def _route_check(work: Path, output: str) -> dict[str, float]:
    """A few fused tensors against W + s·Σ wᵢ(αᵢ/r)BᵢAᵢ from the files (float64): the largest error in
    bfloat16 ulps of the written value, beyond the float32 summation error bound (2⁻¹⁷·(|W| + Σ|products|),
    as the stream sums in float32 and rounds once)."""
    import torch
    from safetensors import safe_open

    base = work / "base" / "transformer"
    index = json.loads((base / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    config = json.loads((base / "config.json").read_text())
    d, s = config["num_layers"] - 1, config["num_single_layers"] - 1
    # (diffusers key, kohya module, row slice of the fused BFL weight, BFL single-file key)
    picks = [
        (
            "transformer_blocks.0.attn.to_k.weight",
            "double_blocks_0_img_attn_qkv",
            (3072, 6144),
            "double_blocks.0.img_attn.qkv.weight",
        ),
        (
            f"transformer_blocks.{d}.ff_context.net.2.weight",
            f"double_blocks_{d}_txt_mlp_2",
            None,
            f"double_blocks.{d}.txt_mlp.2.weight",
        ),
        (
            f"single_transformer_blocks.{s}.proj_mlp.weight",
            f"single_blocks_{s}_linear1",
            (9216, 21504),
            f"single_blocks.{s}.linear1.weight",
        ),
    ]
    worst = 0.0
    for key, module, rows, bfl in picks:
        with safe_open(str(base / index[key]), "pt") as handle:
            exact = handle.get_tensor(key).double()
        operands = exact.abs()
        for i, weight in enumerate(WEIGHTS, start=1):
            with safe_open(str(work / f"lora{i}.safetensors"), "pt") as handle:
                down = handle.get_tensor(f"lora_unet_{module}.lora_down.weight").double()
                up = handle.get_tensor(f"lora_unet_{module}.lora_up.weight").double()
                alpha = float(handle.get_tensor(f"lora_unet_{module}.alpha"))
            up = up[rows[0] : rows[1]] if rows else up
            scale = LORA_SCALE * weight * alpha / down.shape[0]
            exact += scale * (up @ down)
            operands += abs(scale) * (up.abs() @ down.abs())  # Σ|products|: what float32 sums err on
        if output == "folder":
            fused_dir = work / "out-stream" / "fused" / "transformer"
            fused_index = json.loads(
                (fused_dir / "diffusion_pytorch_model.safetensors.index.json").read_text()
            )
            with safe_open(str(fused_dir / fused_index["weight_map"][key]), "pt") as handle:
                got = handle.get_tensor(key)
        else:
            with safe_open(str(work / "out-stream" / "flux1-dev-fused.safetensors"), "pt") as handle:
                got = handle.get_tensor(bfl)
            got = got[rows[0] : rows[1]] if rows else got
        ulp = (torch.nextafter(got.abs(), torch.full_like(got, float("inf"))) - got.abs()).double()
        noise = 2**-17 * operands  # float32 summation bound, ~n·2⁻²⁴·Σ|terms| for n ≤ 128 terms
        worst = max(worst, float((((got.double() - exact).abs() - noise).clamp(min=0) / ulp).max()))
    return {"worst_ulp": worst}


def dit_child(
    argv: list[str],
    *,
    build: Callable[[Path], None],
    check: Callable[[Path, str], dict[str, float]],
    pipeline: str,
    weights: Sequence[float],
    lora_scale: float,
) -> None:
    """``_child ROUTE WORK ARGS…`` of a DiT benchmark (this one, qwen_image.py, wan.py): ``build``,
    ``diffusers`` (PIPELINE's flow on WORK's base and lora1/lora2, fusing the transformer), ``copy``
    (the transformer files) or ``check``; prints the route's ``RESULT`` line for :func:`child_run`."""
    route, work, *rest = argv
    sys.path.insert(0, str(REPO))
    result: dict[str, float] = {}
    if route == "build":
        build(Path(work))
    elif route == "diffusers":
        loras = [Path(work) / f"lora{i}.safetensors" for i in (1, 2)]
        result = route_diffusers_flow(
            pipeline,
            Path(work) / "base",
            loras,
            Path(rest[0]),
            weights=weights,
            lora_scale=lora_scale,
            components=["transformer"],
        )
    elif route == "copy":
        result = _route_copy(Path(work), Path(rest[0]))
    else:
        result = check(Path(work), rest[0])
    print("RESULT " + json.dumps(result))


# -------------------------------------------------------------------------------------------- parent


def _spawn(command: list[str], env: dict[str, str]) -> tuple[float, int, int, str]:
    """Run a process; (wall seconds, peak RSS bytes, exit status, output)."""
    os.sync()
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        log.seek(0)
        text = log.read().decode(errors="replace")
    return wall, usage.ru_maxrss * 1024, status, text


def _env(work: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "LORARECIPE_CACHE": str(work / "cache"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)),
    }


def child_run(script: str, work: Path, *args: str) -> tuple[float, int, int, dict[str, Any], str]:
    """``script _child ROUTE WORK ARGS…`` (a benchmark's child route) in a fresh process:
    (wall seconds, peak RSS, exit status, its RESULT dict, its log). Shared by the DiT benchmarks."""
    wall, rss, status, text = _spawn(
        [sys.executable, script, "_child", args[0], str(work), *args[1:]], _env(work)
    )
    lines = [x for x in text.splitlines() if x.startswith("RESULT ")]
    return wall, rss, status, json.loads(lines[-1][len("RESULT ") :]) if lines else {}, text


def build_run(work: Path, name: str, recipe_text: str) -> tuple[float, int, str]:
    """Write ``recipe-NAME.yaml`` and run one ``lorarecipe build --force`` process on it into
    ``work/out-stream``: (wall seconds, peak RSS, log). Shared by the DiT benchmarks."""
    recipe = work / f"recipe-{name}.yaml"
    recipe.write_text(recipe_text)
    shutil.rmtree(work / "out-stream", ignore_errors=True)
    command = [sys.executable, "-m", "lorarecipe", "build", str(recipe), "--out", str(work / "out-stream")]
    wall, rss, status, text = _spawn([*command, "--force"], _env(work))
    if status != 0:
        raise SystemExit(f"lorarecipe build failed:\n{text[-4000:]}")
    return wall, rss, text


def diffusers_outcome(
    script: str, work: Path, size: int, timings: Callable[[dict[str, Any]], str] = str
) -> str:
    """Run ``script``'s ``diffusers`` child route into ``work/out-diffusers`` (removed after) -> the
    table cell: wall time / peak RSS (``timings`` of its RESULT), or how it died (killed for memory,
    failed). Shared by the DiT benchmarks."""
    _free_disk(work, size + 1000**3)
    wall, rss, status, result, text = child_run(script, work, "diffusers", str(work / "out-diffusers"))
    shutil.rmtree(work / "out-diffusers", ignore_errors=True)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return f"killed by the kernel (out of memory) after {wall:.0f} s at {_gib(rss)}"
    if status != 0:
        return f"failed after {wall:.0f} s at {_gib(rss)}: {text.strip().splitlines()[-1][:200]}"
    return f"{wall:.1f} s / {_gib(rss)} ({timings(result)})"


def claim_work(work: Path, blocks: Any) -> None:
    """Create ``work`` and record the transformer depth (``blocks``) its base is built at; a ``work``
    holding a base of another depth is refused."""
    work.mkdir(parents=True, exist_ok=True)
    recorded = work / "blocks.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != blocks:
        raise SystemExit(f"{work} holds a base of {recorded.read_text()} blocks: use another --work")
    recorded.write_text(json.dumps(blocks))


def build_base(script: str, work: Path) -> tuple[float, int]:
    """Run ``script``'s ``build`` child (base folder and LoRAs, skipped when present) -> (wall seconds,
    bytes of the base's transformer files)."""
    wall, _, status, _, text = child_run(script, work, "build")
    if status != 0:
        raise SystemExit(f"build failed:\n{text[-4000:]}")
    return wall, sum(f.stat().st_size for f in (work / "base" / "transformer").iterdir())


BuildRun = Callable[[Path, str, tuple[float, float], float], tuple[float, int, str]]


def cold_and_warm_builds(
    script: str,
    work: Path,
    output: str,
    size: int,
    build: BuildRun,
    weights: tuple[float, float],
    lora_scale: float,
) -> tuple[tuple[float, int, str], tuple[float, int, str], dict[str, Any]]:
    """One output kind of a benchmark -> (cold, warm, check): ``build(work, output, weights, scale)``
    with an empty factor cache and other weights, then with the factors cached and ``weights``, then
    ``script``'s ``check`` child on the warm build's output; prints a line after each build. Shared by
    the DiT benchmarks."""
    _free_disk(work, size + 3 * 1000**3)
    shutil.rmtree(work / "cache", ignore_errors=True)
    cold = build(work, output, (0.3, 1.2), 1.0)  # cold factor cache, other weights
    print(f"  build {output}, cold cache: {cold[0]:.1f} s, {_gib(cold[1])}", flush=True)
    warm = build(work, output, weights, lora_scale)
    assert "LoRA factors from the cache" in warm[2], warm[2][-2000:]
    _, _, _, check, _ = child_run(script, work, "check", output)
    print(f"  build {output}, cached factors: {warm[0]:.1f} s, {_gib(warm[1])}; {check}", flush=True)
    return cold, warm, check


def _child_run(work: Path, *args: str) -> tuple[float, int, int, dict[str, Any], str]:
    return child_run(__file__, work, *args)


def _build_run(work: Path, output: str, weights: tuple[float, float], scale: float) -> tuple[float, int, str]:
    """One ``lorarecipe build`` process of this benchmark's recipe; (wall seconds, peak RSS, log)."""
    text = RECIPE.format(w1=weights[0], w2=weights[1], scale=scale, output=OUTPUTS[output])
    return build_run(work, output, text)


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def _free_disk(work: Path, needed: int) -> None:
    free = shutil.disk_usage(work).free
    if free < needed:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, {needed / 1e9:.1f} GB needed")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        dit_child(
            argv[1:],
            build=_build,
            check=_route_check,
            pipeline="FluxPipeline",
            weights=WEIGHTS,
            lora_scale=LORA_SCALE,
        )
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/work/bench/flux"))
    parser.add_argument("--skip-diffusers", action="store_true", help="do not run the diffusers flow (a)")
    parser.add_argument(
        "--blocks",
        type=int,
        nargs=2,
        default=(19, 38),
        metavar=("DOUBLE", "SINGLE"),
        help="transformer depth (default FLUX.1-dev's 19 38; the base and one output must fit on disk)",
    )
    args = parser.parse_args(argv)
    work: Path = args.work
    claim_work(work, list(args.blocks))
    if not (work / "base" / "model_index.json").is_file():
        params = 1.2e8 + 3.397e8 * args.blocks[0] + 1.416e8 * args.blocks[1]  # FLUX.1 block sizes
        _free_disk(work, int(2 * 2 * params + 5 * 1000**3))  # bfloat16 base + one output + margin
    print(f"building the FLUX.1-dev-size base and LoRAs in {work} (once) ...", flush=True)
    _, size = build_base(__file__, work)
    print(
        f"  base ready ({size / 1e9:.1f} GB transformer, {args.blocks[0]}+{args.blocks[1]} blocks)",
        flush=True,
    )
    rows: dict[str, str] = {}
    for output in ("folder", "single"):
        cold, warm, check = cold_and_warm_builds(
            __file__, work, output, size, _build_run, WEIGHTS, LORA_SCALE
        )
        rows[output] = (
            f"{warm[0]:.1f} s / {_gib(warm[1])} | {cold[0]:.1f} s / {_gib(cold[1])} | "
            f"{check['worst_ulp']:.2f} ulp"
        )
        shutil.rmtree(work / "out-stream", ignore_errors=True)
    _free_disk(work, size + 1000**3)
    copy_wall, copy_rss, _, _, _ = _child_run(work, "copy", str(work / "out-copy"))
    shutil.rmtree(work / "out-copy", ignore_errors=True)
    print(f"  copy: {copy_wall:.1f} s, {_gib(copy_rss)}", flush=True)
    diffusers = "not run"
    if not args.skip_diffusers:
        diffusers = diffusers_outcome(__file__, work, size)
        print(f"  diffusers: {diffusers}", flush=True)
    print(
        "\n| output | (b) `lorarecipe build`, cached factors: time / peak RSS | (b) cold factor cache "
        "| (b) vs exact (spot check) | (c) copy transformer files | b/c time | (a) diffusers flow |"
    )
    print("|---|---|---|---|---|---|---|")
    for output, label in (("folder", "diffusers folder"), ("single", "BFL single file")):
        warm_time = float(rows[output].split(" s ")[0])
        print(
            f"| {label} | {rows[output]} | {copy_wall:.1f} s | {warm_time / copy_wall:.2f}× "
            f"| {diffusers if output == 'folder' else ''} |"
        )
    load = os.getloadavg()
    print(f"\n(load average at the end: {' / '.join(f'{x:.2f}' for x in load)}; {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
