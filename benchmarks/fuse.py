"""``lorarecipe build`` next to the 20-line diffusers script, as whole processes, on full-size bases.

    python benchmarks/fuse.py [--work DIR] [--dtypes float16 float32] [--sdxl] [--repeat N]

Builds (once, cached in ``--work``) a full-size SD1.5-architecture pipeline from configs with random
weights — UNet2DConditionModel(sample_size=64, cross_attention_dim=768), a CLIP-L text encoder
(768 wide, 12 layers, 49408 tokens), the SD VAE — saved in each dtype, and two rank-32 kohya-layout
LoRAs (UNet attention/ff/1×1 proj + text encoder; r32/α16 at weight 0.8 and r32/α32 at weight 0.5,
lora_scale 0.7). Then, ``--repeat`` times and interleaved (so machine load hits every route alike),
each in a fresh process (wall time, and peak RSS from ``os.wait4``; warm page cache, ``sync``
before each run):

(a) diffusers: the guides' flow — from_pretrained(dtype), load_lora_weights ×2, set_adapters,
    fuse_lora, unload_lora_weights, save_pretrained (no fsync), torch's default threads;
(b) ``lorarecipe build recipe.yaml --force`` with one ``pipeline`` output: first build of these LoRA
    files (factor cache emptied: diffusers converts them and PEFT decides the targets on a
    weightless model), then a rebuild with the factors cached (imports torch, not diffusers);
    lorarecipe's thread policy (the manifest records it);
(c) copy: ``shutil.copyfile`` of the base's files plus fsync, the I/O floor of (b).

Prints medians, and checks (a) == (b) tensor by tensor. Also times a process that only imports what
the diffusers route imports (torch, diffusers, transformers, peft), and the compute floor of any
exact fuse: the FLOPs of every LoRA delta (2·r·out·in per module, from the files) at the float32
GEMM rate measured here. ``--sdxl`` adds an SDXL-architecture base (UNet 2.6 B, CLIP-L + bigG text
encoders, SDXL VAE), in float16 only to fit a 24 GB machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fullsize import (
    route_diffusers_flow,  # benchmarks/fullsize.py: the diffusers flow shared by the benchmarks
)

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(tempfile.gettempdir()) / "lorarecipe-bench-fuse-cache"  # LORARECIPE_CACHE of the children
WEIGHTS = (0.8, 0.5)
LORA_SCALE = 0.7
RECIPE = """\
base: {{path: {base}}}
adapters:
  l1: {{file: {l1}}}
  l2: {{file: {l2}}}
set_adapters:
  adapters: {{l1: {w1}, l2: {w2}}}
fuse:
  lora_scale: {scale}
outputs:
  fused: {{kind: pipeline, path: fused}}
"""


# ------------------------------------------------------------------------------------------ children


def _materialize(model: Any, dtype: Any) -> None:
    """Meta parameters -> random CPU tensors (N(0, 0.02)) in ``dtype``, one parameter at a time."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta":
                value = torch.randn(param.shape, generator=generator).mul_(0.02).to(dtype)
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    if any(t.device.type == "meta" for t in model.buffers()):
        raise SystemExit("meta buffers left in the UNet")


def _build(arch: str, work: Path, dtypes: list[str]) -> None:
    """Child: the random full-size base in every dtype and the two LoRAs (skipped when present)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lorarecipe.builtin.loras import make_kohya_lora
    from lorarecipe.builtin.tokenizer import build_clip_tokenizer

    missing = [d for d in dtypes if not (work / arch / f"base-{d}" / "model_index.json").is_file()]
    loras = [work / arch / f"lora{i}.safetensors" for i in (1, 2)]
    if not missing and all(p.is_file() for p in loras):
        return
    torch.manual_seed(0)
    tok = build_clip_tokenizer()
    clip_l = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    common = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
    vae_cfg = dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe: Any
    if arch == "sd15":
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(sample_size=512, **vae_cfg),
            text_encoder=CLIPTextModel(CLIPTextConfig(**clip_l, **common, projection_dim=768)),
            tokenizer=tok,
            unet=UNet2DConditionModel(sample_size=64, cross_attention_dim=768),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        big_g = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20)
        with torch.device("meta"):  # 2.6 B parameters: materialized below directly in the target dtype
            unet = UNet2DConditionModel(
                sample_size=128,
                cross_attention_dim=2048,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(320, 640, 1280),
                transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 10, 20),
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
                use_linear_projection=True,
            )
        _materialize(unet, torch.float32 if "float32" in missing else torch.float16)
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL(sample_size=1024, **vae_cfg),
            text_encoder=CLIPTextModel(CLIPTextConfig(**clip_l, **common, projection_dim=768)),
            text_encoder_2=CLIPTextModelWithProjection(
                CLIPTextConfig(**big_g, **{**common, "hidden_act": "gelu"}, projection_dim=1280)
            ),
            tokenizer=tok,
            tokenizer_2=tok,
            unet=unet,
            scheduler=scheduler,
        )
    for i, (path, alpha) in enumerate(zip(loras, (16.0, 32.0), strict=True)):
        make_kohya_lora(pipe, path, rank=32, alpha=alpha, seed=11 + i, scale=0.05)
    for dtype in sorted(missing, key=lambda d: d != "float32"):  # float32 first, then cast down
        pipe.to(getattr(torch, dtype)).save_pretrained(work / arch / f"base-{dtype}", safe_serialization=True)


def _route_diffusers(base: Path, l1: Path, l2: Path, out: Path, dtype: str) -> dict[str, float]:
    """(a): the guides' flow in ``dtype``, fusing every component fuse_lora fuses by default."""
    return route_diffusers_flow(
        "DiffusionPipeline",
        base,
        (l1, l2),
        out,
        weights=WEIGHTS,
        lora_scale=LORA_SCALE,
        dtype=dtype,
        components=None,
        oom_first=False,
    )


def _route_build(recipe: Path, out: Path) -> dict[str, float]:
    """A whole ``lorarecipe build`` (this child only execs it, so its peak RSS is the build's)."""
    os.execv(
        sys.executable,
        [sys.executable, "-m", "lorarecipe", "build", str(recipe), "--out", str(out), "--quiet", "--force"],
    )
    raise AssertionError("unreachable")


def _route_gemm(l1: Path, l2: Path) -> dict[str, float]:
    """The arithmetic every exact fuse must do: each LoRA delta element is a rank-r dot product.
    FLOPs from the LoRA files' shapes (2·r·out·in per module) and the rate of torch's float32 GEMM
    at the stream's chunk shape here (768×r @ r×1280, best of 20): a lower bound on the compute of
    (a) and (b), with no I/O."""
    import torch

    from lorarecipe.inspect.safetensors_header import read_header

    flops, rank = 0.0, 32
    for lora in (l1, l2):
        shapes = {name: info.shape for name, info in read_header(lora).tensors.items()}
        for name, down in shapes.items():
            if name.endswith(".lora_down.weight"):
                up = shapes[name.replace(".lora_down.", ".lora_up.")]
                rank = down[0]
                inner = 1
                for n in down[1:]:
                    inner *= n
                flops += 2.0 * down[0] * up[0] * inner
    b, a = torch.randn(768, rank), torch.randn(rank, 1280)
    best = float("inf")
    for _ in range(20):
        started = time.perf_counter()
        for _ in range(10):
            b @ a
        best = min(best, (time.perf_counter() - started) / 10)
    rate = 2.0 * 768 * rank * 1280 / best
    # what hashing every output byte for the manifest costs here: sha256 of 256 MiB, best of 3
    import hashlib

    block = os.urandom(256 << 20)
    hashed = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        hashlib.sha256(block).digest()
        hashed = min(hashed, time.perf_counter() - started)
    return {
        "gflop": flops / 1e9,
        "gflops": rate / 1e9,
        "seconds": flops / rate,
        "sha256_gb_per_s": len(block) / hashed / 1e9,
    }


def _route_imports() -> dict[str, float]:
    """What every route pays before touching a tensor: torch, diffusers' LoRA loader and models,
    transformers' CLIP, peft, accelerate."""
    started = time.perf_counter()
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from diffusers import UNet2DConditionModel  # noqa: F401
    from diffusers.loaders import lora_pipeline  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    return {"imports": time.perf_counter() - started}


def _route_copy(base: Path, out: Path) -> dict[str, float]:
    started = time.perf_counter()
    for file in sorted(base.rglob("*")):
        if file.is_file():
            target = out / file.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
            with open(target, "rb+") as handle:
                os.fsync(handle.fileno())
    return {"copy": time.perf_counter() - started}


def _compare(a: Path, b: Path) -> dict[str, float]:
    """Child: every tensor of every weight file of folder a vs b (max |Δ|, tensors not bit-identical)."""
    import torch
    from safetensors import safe_open

    worst, differ, total = 0.0, 0, 0
    for file in sorted(a.rglob("*.safetensors")):
        with safe_open(str(file), "pt") as fa, safe_open(str(b / file.relative_to(a)), "pt") as fb:
            if set(fa.keys()) != set(fb.keys()):
                raise SystemExit(f"{file}: key sets differ")
            for key in fa.keys():  # noqa: SIM118 - safe_open handles are not mappings
                x, y = fa.get_tensor(key), fb.get_tensor(key)
                total += 1
                if x.dtype != y.dtype or not torch.equal(x, y):
                    differ += 1
                    worst = max(worst, float((x.double() - y.double()).abs().max()))
    return {"tensors": total, "differ": differ, "max_abs_diff": worst}


def _child(argv: list[str]) -> None:
    route, *args = argv
    sys.path.insert(0, str(REPO))
    if route == "build":
        _build(args[0], Path(args[1]), args[2:])
        result: dict[str, float] = {}
    elif route == "diffusers":
        result = _route_diffusers(Path(args[0]), Path(args[1]), Path(args[2]), Path(args[3]), args[4])
    elif route == "lorarecipe":
        result = _route_build(Path(args[0]), Path(args[1]))
    elif route == "copy":
        result = _route_copy(Path(args[0]), Path(args[1]))
    elif route == "imports":
        result = _route_imports()
    elif route == "gemm":
        result = _route_gemm(Path(args[0]), Path(args[1]))
    else:
        result = _compare(Path(args[0]), Path(args[1]))
    print("RESULT " + json.dumps(result))


# -------------------------------------------------------------------------------------------- parent


def _spawn(*args: str) -> tuple[float, int, dict[str, float]]:
    """Run a child route; returns (wall seconds, peak RSS bytes of that child, its result)."""
    os.sync()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "LORARECIPE_CACHE": str(CACHE)}
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, __file__, "_child", *args], stdout=log, stderr=log, env=env)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        log.seek(0)
        text = log.read().decode(errors="replace")
    if status != 0:
        raise SystemExit(f"child {args[0]} failed:\n{text[-4000:]}")
    lines = [x for x in text.splitlines() if x.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT ") :]) if lines else {}
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # less sensitive to other load than wall time
    return wall, usage.ru_maxrss * 1024, result


def _warm(paths: list[Path]) -> None:
    for root in paths:
        for file in [root] if root.is_file() else sorted(root.rglob("*")):
            if file.is_file():
                with open(file, "rb") as handle:
                    while handle.read(64 << 20):
                        pass


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def run(arch: str, dtype: str, work: Path, repeat: int) -> list[str]:
    base, l1, l2 = (
        work / arch / f"base-{dtype}",
        work / arch / "lora1.safetensors",
        work / arch / "lora2.safetensors",
    )
    recipe = work / arch / f"recipe-{dtype}.yaml"
    recipe.write_text(
        RECIPE.format(base=base.name, l1=l1.name, l2=l2.name, w1=WEIGHTS[0], w2=WEIGHTS[1], scale=LORA_SCALE)
    )
    outs = {r: work / arch / f"out-{r}-{dtype}" for r in ("diffusers", "first", "cached", "copy")}
    rows: dict[str, list[tuple[float, int, dict[str, float]]]] = {r: [] for r in outs}
    _warm([base, l1, l2])
    for _ in range(repeat):  # interleaved: every route sees the same machine load
        for route, out in outs.items():
            shutil.rmtree(out, ignore_errors=True)
            if route == "first":  # these LoRA files were never fused here: empty factor cache
                shutil.rmtree(CACHE / "factors", ignore_errors=True)
            args = {
                "diffusers": ("diffusers", str(base), str(l1), str(l2), str(out), dtype),
                "first": ("lorarecipe", str(recipe), str(out)),
                "cached": ("lorarecipe", str(recipe), str(out)),
                "copy": ("copy", str(base), str(out)),
            }[route]
            rows[route].append(_spawn(*args))
            print(
                f"  {arch} {dtype} {route}: {rows[route][-1][0]:.1f} s, {_gib(rows[route][-1][1])}",
                flush=True,
            )
    manifest = json.loads((outs["cached"] / "manifest.json").read_text())
    assert manifest["checks"]["fuse"]["fused"]["lora_factors_from_cache"] is True
    threads = manifest["threads"]["torch_intra_op"]
    imports = min(_spawn("imports")[0] for _ in range(repeat))
    gemm = _spawn("gemm", str(l1), str(l2))[2]
    _, _, check = _spawn("compare", str(outs["diffusers"]), str(outs["cached"] / "fused"))
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    wall = {r: _median([x[0] for x in v]) for r, v in rows.items()}
    cpu = {r: _median([x[2]["cpu_seconds"] for x in v]) for r, v in rows.items()}
    peak = {r: max(x[1] for x in v) for r, v in rows.items()}
    a = wall["diffusers"]
    hash_rate = gemm["sha256_gb_per_s"]
    label = f"{'SD1.5' if arch == 'sd15' else 'SDXL'} {dtype} ({_gib(_size(base))})"
    return [
        f"| {label} | {a:.1f} s ({cpu['diffusers']:.1f} s CPU) / {_gib(peak['diffusers'])} "
        f"| {wall['first']:.1f} s ({cpu['first']:.1f} s CPU) / {_gib(peak['first'])} "
        f"| {wall['cached']:.1f} s ({cpu['cached']:.1f} s CPU) / {_gib(peak['cached'])} "
        f"| {wall['copy']:.1f} s | **{wall['first'] / a:.2f}×** | **{wall['cached'] / a:.2f}×** "
        f"| {peak['first'] / peak['diffusers']:.2f}× / {peak['cached'] / peak['diffusers']:.2f}× "
        f"| {threads} | {imports:.1f} s | {gemm['gflop']:.0f} GFLOP at {gemm['gflops']:.0f} GFLOPS: "
        f"{gemm['seconds']:.1f} s | {hash_rate:.2f} GB/s: {_size(base) / 1e9 / hash_rate:.1f} s "
        f"| {int(check['differ'])} of {int(check['tensors'])} differ, "
        f"max {check['max_abs_diff']:.3g} |"
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        _child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lorarecipe-bench-fuse")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "float32"], choices=["float16", "float32"])
    parser.add_argument("--sdxl", action="store_true", help="also an SDXL-architecture base (float16)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="interleaved runs per route (median time, worst RSS)"
    )
    args = parser.parse_args(argv)
    plans = [("sd15", args.dtypes)] + ([("sdxl", ["float16"])] if args.sdxl else [])
    lines = [
        "| base | (a) diffusers flow: wall (CPU) / peak RSS "
        "| (b) `lorarecipe build`, first build of these LoRAs "
        "| (b) rebuild, factors cached | (c) copy base files | first / a | cached / a | RSS first / a, "
        "cached / a | torch threads (b) | python + imports of (a) | LoRA deltas: compute floor "
        "| sha256 of the output (manifest): rate, CPU | (a) vs (b) tensors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, dtypes in plans:
        print(f"building {arch} base ({', '.join(dtypes)}) in {args.work} ...", flush=True)
        _spawn("build", arch, str(args.work), *dtypes)
        for dtype in dtypes:
            lines += run(arch, dtype, args.work, args.repeat)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print("\n".join(lines))
    if load is not None:
        averages = " / ".join(f"{x:.2f}" for x in load)
        print(f"\n(load average at the end: {averages}; {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
