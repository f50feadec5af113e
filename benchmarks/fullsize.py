"""What the full-size benchmarks (``flux.py``, ``qwen_image.py``, ``wan.py``, ``fuse.py``) share: each
measured route runs in a fresh child process (wall time and peak RSS from ``os.wait4``), the diffusers
flow from the guides as one route, bases written tensor by tensor into shards, and the build loop
(first build with an empty factor cache, then a rebuild with cached factors)."""

from __future__ import annotations

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
#: one build route of a benchmark: (work, output, weights, lora_scale) -> (wall s, peak RSS, log)
BuildRun = Callable[[Path, str, tuple[float, float], float], tuple[float, int, str]]
SHARD_BYTES = 10 * 1000**3  # diffusers' save_pretrained default shard size (FLUX.1-dev, Qwen-Image, Wan)


def write_shards(model: Any, folder: Path) -> None:
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


def route_copy(work: Path, out: Path) -> dict[str, float]:
    started = time.perf_counter()
    for file in sorted((work / "base" / "transformer").iterdir()):
        target = out / file.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
        with open(target, "rb+") as handle:
            os.fsync(handle.fileno())
    return {"copy": time.perf_counter() - started}


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
        result = route_copy(Path(work), Path(rest[0]))
    else:
        result = check(Path(work), rest[0])
    print("RESULT " + json.dumps(result))


def spawn(command: list[str], env: dict[str, str]) -> tuple[float, int, int, str]:
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


def child_env(work: Path) -> dict[str, str]:
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
    wall, rss, status, text = spawn(
        [sys.executable, script, "_child", args[0], str(work), *args[1:]], child_env(work)
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
    wall, rss, status, text = spawn([*command, "--force"], child_env(work))
    if status != 0:
        raise SystemExit(f"lorarecipe build failed:\n{text[-4000:]}")
    return wall, rss, text


def diffusers_outcome(
    script: str, work: Path, size: int, timings: Callable[[dict[str, Any]], str] = str
) -> str:
    """Run ``script``'s ``diffusers`` child route into ``work/out-diffusers`` (removed after) -> the
    table cell: wall time / peak RSS (``timings`` of its RESULT), or how it died (killed for memory,
    failed). Shared by the DiT benchmarks."""
    free_disk(work, size + 1000**3)
    wall, rss, status, result, text = child_run(script, work, "diffusers", str(work / "out-diffusers"))
    shutil.rmtree(work / "out-diffusers", ignore_errors=True)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return f"killed by the kernel (out of memory) after {wall:.0f} s at {gib(rss)}"
    if status != 0:
        return f"failed after {wall:.0f} s at {gib(rss)}: {text.strip().splitlines()[-1][:200]}"
    return f"{wall:.1f} s / {gib(rss)} ({timings(result)})"


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
    free_disk(work, size + 3 * 1000**3)
    shutil.rmtree(work / "cache", ignore_errors=True)
    cold = build(work, output, (0.3, 1.2), 1.0)  # cold factor cache, other weights
    print(f"  build {output}, cold cache: {cold[0]:.1f} s, {gib(cold[1])}", flush=True)
    warm = build(work, output, weights, lora_scale)
    assert "LoRA factors from the cache" in warm[2], warm[2][-2000:]
    _, _, _, check, _ = child_run(script, work, "check", output)
    print(f"  build {output}, cached factors: {warm[0]:.1f} s, {gib(warm[1])}; {check}", flush=True)
    return cold, warm, check


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def free_disk(work: Path, needed: int) -> None:
    free = shutil.disk_usage(work).free
    if free < needed:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, {needed / 1e9:.1f} GB needed")
