"""Fuse two LoRAs into a full-width Qwen-Image transformer: ``lorarecipe build`` vs the diffusers flow.

    python benchmarks/qwen_image.py [--work /work/bench/qwen-image] [--blocks 60] [--skip-diffusers]

Builds once, in ``--work``, a Qwen-Image-architecture pipeline folder with random weights: the
transformer at full width (3072, 24 heads, image and text MLPs ×4, joint text width 3584) with
``--blocks`` of its 60 joint blocks (20.4 B parameters at 60, bfloat16, written tensor by tensor from
the meta device into 10 GB shards like the published one), plus a tiny Qwen2.5-VL text encoder and
VAE (they carry no LoRA); and two rank-32 kohya-layout LoRAs as Lightning and musubi write them
(``lora_unet_transformer_blocks_0_attn_to_q``, diffusers' Qwen-Image converter reads them) on every
attention and MLP projection (r32/α16 at weight 0.8, r32/α32 at weight 0.5, lora_scale 0.7). Then,
each in a fresh process (peak RSS from ``os.wait4``, ``sync`` before each run; the machine is shared,
so times are upper bounds):

(b) ``python -m lorarecipe build`` (streaming executor): a diffusers folder, then the single file
    ComfyUI and ``from_single_file`` read; first with an empty factor cache, then with cached factors
    and other weights (what a user tuning weights runs);
(c) copying the base's transformer files with fsync: the I/O floor of (b);
(a) the diffusers flow: from_pretrained(bfloat16), load_lora_weights ×2, set_adapters, fuse_lora,
    unload_lora_weights, save_pretrained (killed first if memory runs out);

and spot-checks (b) against W + 0.7·Σ wᵢ·(αᵢ/r)·BᵢAᵢ from the files (float64): at most half a
bfloat16 ulp beyond the float32 summation bound. The shared helpers are benchmarks/fullsize.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fullsize import (
    build_base,
    build_run,
    child_run,
    claim_work,
    cold_and_warm_builds,
    diffusers_outcome,
    dit_child,
    free_disk,
    gib,
    write_shards,
)

WEIGHTS = (0.8, 0.5)
LORA_SCALE = 0.7
BLOCK_PARAMS = 3.397e8  # parameters of one Qwen-Image joint block (8 attention projections, 2 MLPs, 2 mods)
RECIPE = """\
base: {{path: base}}
adapters:
  l1: {{file: lora1.safetensors}}
  l2: {{file: lora2.safetensors}}
set_adapters:
  adapters: {{l1: {w1}, l2: {w2}}}
fuse:
  lora_scale: {scale}
outputs:
  {output}
"""
OUTPUTS = {
    "folder": "fused: {kind: pipeline, path: fused, card: false}",
    "single": "single: {kind: single_file, path: qwen-image-fused.safetensors}",
}
_TARGETS = ("attn.to_", "attn.add_", "img_mlp.", "txt_mlp.")  # attention and MLPs, as Lightning


def _build(work: Path) -> None:
    """Child: the base folder and the two LoRAs (skipped when present)."""
    from types import SimpleNamespace

    import torch
    from diffusers import QwenImageTransformer2DModel

    from lorarecipe.builtin.dit_loras import make_dit_lora
    from lorarecipe.builtin.dit_pipelines import build_qwen_image

    base = work / "base"
    blocks = json.loads((work / "blocks.json").read_text())
    with torch.device("meta"):  # Qwen-Image's configuration, at the depth that fits the disk
        transformer = QwenImageTransformer2DModel(num_layers=blocks)
    if not (base / "model_index.json").is_file():
        tmp = work / "base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        small = build_qwen_image()  # the tiny text encoder, tokenizer, VAE and scheduler
        small.transformer = None
        small.register_modules(transformer=None)
        small.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["transformer"] = ["diffusers", "QwenImageTransformer2DModel"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        transformer.save_config(tmp / "transformer")
        write_shards(transformer, tmp / "transformer")
        os.replace(tmp, base)
    for i, alpha in enumerate((16.0, 32.0), start=1):
        path = work / f"lora{i}.safetensors"
        if not path.is_file():
            make_dit_lora(
                SimpleNamespace(transformer=transformer),
                path,
                family="qwen_image",
                layout="kohya",
                rank=32,
                alpha=alpha,
                seed=10 + i,
                text_encoders=False,
                scale=0.05,
                select=lambda name: (
                    any(t in name for t in _TARGETS) and name.startswith("transformer_blocks.")
                ),
                dtype=torch.bfloat16,
            )


def _route_check(work: Path, output: str) -> dict[str, float]:
    """A few fused tensors against W + s·Σ wᵢ(αᵢ/r)BᵢAᵢ from the files (float64): the largest error in
    bfloat16 ulps of the written value beyond the float32 summation bound (the stream sums in float32
    and rounds once)."""
    import torch
    from safetensors import safe_open

    base = work / "base" / "transformer"
    index = json.loads((base / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    last = json.loads((base / "config.json").read_text())["num_layers"] - 1
    picks = [
        "transformer_blocks.0.attn.to_k.weight",
        f"transformer_blocks.{last}.txt_mlp.net.2.weight",
        f"transformer_blocks.{last // 2}.img_mlp.net.0.proj.weight",
    ]
    worst = 0.0
    for key in picks:
        with safe_open(str(base / index[key]), "pt") as handle:
            exact = handle.get_tensor(key).double()
        operands = exact.abs()
        module = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        for i, weight in enumerate(WEIGHTS, start=1):
            with safe_open(str(work / f"lora{i}.safetensors"), "pt") as handle:
                down = handle.get_tensor(f"{module}.lora_down.weight").double()
                up = handle.get_tensor(f"{module}.lora_up.weight").double()
                alpha = float(handle.get_tensor(f"{module}.alpha"))
            scale = LORA_SCALE * weight * alpha / down.shape[0]
            exact += scale * (up @ down)
            operands += abs(scale) * (up.abs() @ down.abs())
        if output == "folder":
            fused = work / "out-stream" / "fused" / "transformer"
            fused_index = json.loads((fused / "diffusion_pytorch_model.safetensors.index.json").read_text())
            path = fused / fused_index["weight_map"][key]
        else:
            path = work / "out-stream" / "qwen-image-fused.safetensors"
        with safe_open(str(path), "pt") as handle:
            got = handle.get_tensor(key)
        ulp = (torch.nextafter(got.abs(), torch.full_like(got, float("inf"))) - got.abs()).double()
        noise = 2**-17 * operands
        worst = max(worst, float((((got.double() - exact).abs() - noise).clamp(min=0) / ulp).max()))
    return {"worst_ulp": worst}


def _timings(result: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.0f} s" for k, v in result.items())


def _child_run(work: Path, *args: str) -> tuple[float, int, int, dict[str, Any], str]:
    return child_run(__file__, work, *args)


def _build_run(work: Path, output: str, weights: tuple[float, float], scale: float) -> tuple[float, int, str]:
    text = RECIPE.format(w1=weights[0], w2=weights[1], scale=scale, output=OUTPUTS[output])
    return build_run(work, output, text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        dit_child(
            argv[1:],
            build=_build,
            check=_route_check,
            pipeline="QwenImagePipeline",
            weights=WEIGHTS,
            lora_scale=LORA_SCALE,
        )
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/work/bench/qwen-image"))
    parser.add_argument("--skip-diffusers", action="store_true", help="do not run the diffusers flow (a)")
    parser.add_argument(
        "--blocks",
        type=int,
        default=60,
        help="joint blocks (Qwen-Image: 60; the base and one output must fit)",
    )
    args = parser.parse_args(argv)
    work: Path = args.work
    claim_work(work, args.blocks)
    params = 4.0e7 + BLOCK_PARAMS * args.blocks
    if not (work / "base" / "model_index.json").is_file():
        free_disk(work, int(2 * 2 * params + 5 * 1000**3))  # bfloat16 base + one output + margin
    print(
        f"building the Qwen-Image-width base ({params / 1e9:.1f} B parameters) and LoRAs in {work} ...",
        flush=True,
    )
    wall, size = build_base(__file__, work)
    print(f"  base ready ({size / 1e9:.1f} GB transformer, {args.blocks} blocks; {wall:.0f} s)", flush=True)
    rows: dict[str, tuple[float, str]] = {}
    for output in ("folder", "single"):
        cold, warm, check = cold_and_warm_builds(
            __file__, work, output, size, _build_run, WEIGHTS, LORA_SCALE
        )
        text = f"{warm[0]:.1f} s / {gib(warm[1])} | {cold[0]:.1f} s / {gib(cold[1])} | "
        text += f"{check['worst_ulp']:.2f} ulp"
        rows[output] = (warm[0], text)
        shutil.rmtree(work / "out-stream", ignore_errors=True)
    free_disk(work, size + 1000**3)
    copy_wall, copy_rss, _, _, _ = _child_run(work, "copy", str(work / "out-copy"))
    shutil.rmtree(work / "out-copy", ignore_errors=True)
    print(f"  copy: {copy_wall:.1f} s, {gib(copy_rss)}", flush=True)
    diffusers = "not run" if args.skip_diffusers else diffusers_outcome(__file__, work, size, _timings)
    print(f"  diffusers: {diffusers}", flush=True)
    print(
        "\n| output | (b) `lorarecipe build`, cached factors: time / peak RSS | (b) cold factor cache "
        "| (b) vs exact (spot check) | (c) copy transformer files | b/c time | (a) diffusers flow |"
    )
    print("|---|---|---|---|---|---|---|")
    for output, label in (("folder", "diffusers folder"), ("single", "single file (ComfyUI)")):
        warm_time, text = rows[output]
        print(
            f"| {label} | {text} | {copy_wall:.1f} s | {warm_time / copy_wall:.2f}× "
            f"| {diffusers if output == 'folder' else ''} |"
        )
    load = os.getloadavg()
    print(f"\n(load average at the end: {' / '.join(f'{x:.2f}' for x in load)}; {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
