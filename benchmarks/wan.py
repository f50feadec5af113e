"""Fuse two LoRAs into a full-width Wan 2.2 A14B expert: ``lorarecipe build`` vs the copy floor and diffusers.

    python benchmarks/wan.py [--work /work/bench/wan] [--blocks 40] [--skip-diffusers]

Builds once, in ``--work``, a Wan pipeline folder with random weights whose transformer is one Wan 2.2
T2V-A14B expert at full width (5120 wide, 40 heads, FFN 13824, bfloat16 as released; ``--blocks`` of its
40 blocks, 14.0 B parameters at 40: the base and one output need ~57 GB of disk, so a shared disk may
need fewer), written tensor by tensor from the meta device in shards, plus a one-layer UMT5 of the real
width (4096) and a small Wan VAE; and two rank-32 musubi-tuner-layout LoRAs
(``lora_unet_blocks_0_self_attn_q``) on every self-attention, cross-attention and FFN Linear (r32/α16 at
weight 0.8, r32/α32 at weight 0.5, lora_scale 0.7). Then, each in a fresh process (peak RSS from
``os.wait4``, ``sync`` before each run; the machine is shared, so times are upper bounds):

(b) ``python -m lorarecipe build`` (streaming executor): a diffusers folder, then the expert as one
    original-layout Wan file; first with an empty factor cache, then with cached factors and other
    weights;
(c) copying the base's transformer files with fsync: the I/O floor of (b);
(a) the diffusers flow: WanPipeline.from_pretrained(bfloat16), load_lora_weights ×2, set_adapters,
    fuse_lora, unload_lora_weights, save_pretrained (diffusers keeps the time embedder, norms and
    modulation in float32, and so does (b)).

and spot-checks (b): for a few fused tensors, W + 0.7·Σ wᵢ·(αᵢ/r)·BᵢAᵢ from the files (float64) is within
half a bfloat16 ulp of what was written (beyond float32's summation bound). Reuses
``benchmarks/fullsize.py``'s shard writer and process helpers. Prints a markdown table for the README.
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
import fullsize  # benchmarks/fullsize.py: shard writer, process helpers

WEIGHTS = (0.8, 0.5)
LORA_SCALE = 0.7
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
    "single": "single: {kind: single_file, path: wan2.2_t2v_high_noise_fused.safetensors}",
}
BLOCK_PARAMS = 8 * 5120**2 + 2 * 5120 * 13824  # attn1 + attn2 (q, k, v, o) + FFN, per block
PICKS = (  # (diffusers key, musubi module, Wan single-file key)
    ("blocks.0.attn1.to_q.weight", "blocks_0_self_attn_q", "blocks.0.self_attn.q.weight"),
    ("blocks.{last}.attn2.to_v.weight", "blocks_{last}_cross_attn_v", "blocks.{last}.cross_attn.v.weight"),
    ("blocks.{last}.ffn.net.0.proj.weight", "blocks_{last}_ffn_0", "blocks.{last}.ffn.0.weight"),
)


def _build(work: Path) -> None:
    """Child: the base folder and the two LoRAs (skipped when present)."""
    from types import SimpleNamespace

    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from lorarecipe.builtin.dit_loras import make_original_lora
    from lorarecipe.builtin.tokenizer import build_t5_tokenizer
    from lorarecipe.families import FAMILIES

    base = work / "base"
    blocks = json.loads((work / "blocks.json").read_text())
    with torch.device("meta"):  # one Wan 2.2 T2V-A14B expert (= Wan 2.1 T2V-14B's architecture)
        transformer = WanTransformer3DModel(num_layers=blocks)
    if not (base / "model_index.json").is_file():
        tmp = work / "base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = build_t5_tokenizer()
        torch.manual_seed(0)
        text_encoder = UMT5EncoderModel(  # width 4096, as umt5-xxl; one small layer
            UMT5Config(
                vocab_size=len(tokenizer),
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
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
        small = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler)
        small.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["transformer"] = ["diffusers", "WanTransformer3DModel"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        transformer.save_config(tmp / "transformer")
        fullsize.write_shards(transformer, tmp / "transformer")
        os.replace(tmp, base)
    for i, alpha in enumerate((16.0, 32.0), start=1):
        path = work / f"lora{i}.safetensors"
        if not path.is_file():
            make_original_lora(
                FAMILIES["wan"],
                SimpleNamespace(transformer=transformer),
                path,
                layout="kohya",
                rank=32,
                alpha=alpha,
                seed=10 + i,
                select=lambda name: name.startswith("blocks."),
                scale=0.05,
                dtype=torch.bfloat16,
            )


def _route_check(work: Path, output: str) -> dict[str, float]:
    """A few fused tensors against W + s·Σ wᵢ(αᵢ/r)BᵢAᵢ from the files (float64): the largest error in
    bfloat16 ulps of the written value, beyond the float32 summation bound (see benchmarks/flux.py)."""
    import torch
    from safetensors import safe_open

    base = work / "base" / "transformer"
    index = json.loads((base / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    last = json.loads((base / "config.json").read_text())["num_layers"] - 1
    worst = 0.0
    for key, module, original in (
        (k.format(last=last), m.format(last=last), o.format(last=last)) for k, m, o in PICKS
    ):
        with safe_open(str(base / index[key]), "pt") as handle:
            exact = handle.get_tensor(key).double()
        operands = exact.abs()
        for i, weight in enumerate(WEIGHTS, start=1):
            with safe_open(str(work / f"lora{i}.safetensors"), "pt") as handle:
                down = handle.get_tensor(f"lora_unet_{module}.lora_down.weight").double()
                up = handle.get_tensor(f"lora_unet_{module}.lora_up.weight").double()
                alpha = float(handle.get_tensor(f"lora_unet_{module}.alpha"))
            scale = LORA_SCALE * weight * alpha / down.shape[0]
            exact += scale * (up @ down)
            operands += abs(scale) * (up.abs() @ down.abs())
        if output == "folder":
            fused = work / "out-stream" / "fused" / "transformer"
            fused_index = json.loads((fused / "diffusion_pytorch_model.safetensors.index.json").read_text())
            with safe_open(str(fused / fused_index["weight_map"][key]), "pt") as handle:
                got = handle.get_tensor(key)
        else:
            with safe_open(
                str(work / "out-stream" / "wan2.2_t2v_high_noise_fused.safetensors"), "pt"
            ) as handle:
                got = handle.get_tensor(original)
        ulp = (torch.nextafter(got.abs(), torch.full_like(got, float("inf"))) - got.abs()).double()
        noise = 2**-17 * operands
        worst = max(worst, float((((got.double() - exact).abs() - noise).clamp(min=0) / ulp).max()))
    return {"worst_ulp": worst}


def _child_run(work: Path, *args: str) -> tuple[float, int, int, dict[str, Any], str]:
    return fullsize.child_run(__file__, work, *args)


def _build_run(work: Path, output: str, weights: tuple[float, float], scale: float) -> tuple[float, int, str]:
    text = RECIPE.format(w1=weights[0], w2=weights[1], scale=scale, output=OUTPUTS[output])
    return fullsize.build_run(work, output, text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        fullsize.dit_child(
            argv[1:],
            build=_build,
            check=_route_check,
            pipeline="WanPipeline",
            weights=WEIGHTS,
            lora_scale=LORA_SCALE,
        )
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/work/bench/wan"))
    parser.add_argument("--skip-diffusers", action="store_true", help="do not run the diffusers flow (a)")
    parser.add_argument(
        "--blocks", type=int, default=40, help="expert depth (A14B: 40; base + one output must fit)"
    )
    args = parser.parse_args(argv)
    work: Path = args.work
    fullsize.claim_work(work, args.blocks)
    if not (work / "base" / "model_index.json").is_file():
        fullsize.free_disk(work, int(2 * 2 * BLOCK_PARAMS * args.blocks + 5 * 1000**3))
    print(f"building the Wan 2.2 A14B expert-size base and LoRAs in {work} (once) ...", flush=True)
    _, size = fullsize.build_base(__file__, work)
    params = size / 2 / 1e9
    print(
        f"  base ready ({size / 1e9:.1f} GB transformer, {args.blocks} blocks, {params:.1f} B parameters)",
        flush=True,
    )
    rows: dict[str, str] = {}
    ratios: dict[str, float] = {}
    copy_wall = 0.0
    for output in ("folder", "single"):
        cold, warm, check = fullsize.cold_and_warm_builds(
            __file__, work, output, size, _build_run, WEIGHTS, LORA_SCALE
        )
        shutil.rmtree(work / "out-stream", ignore_errors=True)
        fullsize.free_disk(work, size + 1000**3)
        copy_wall, _, _, _, _ = _child_run(work, "copy", str(work / "out-copy"))  # beside each output's run
        shutil.rmtree(work / "out-copy", ignore_errors=True)
        ratios[output] = warm[0] / copy_wall
        rows[output] = (
            f"{warm[0]:.1f} s / {fullsize.gib(warm[1])} | {cold[0]:.1f} s / {fullsize.gib(cold[1])} | "
            f"{check['worst_ulp']:.2f} ulp | {copy_wall:.1f} s | {ratios[output]:.1f}×"
        )
        print(f"  copy: {copy_wall:.1f} s", flush=True)
    diffusers = "not run"
    if not args.skip_diffusers:
        diffusers = fullsize.diffusers_outcome(__file__, work, size)
        print(f"  diffusers: {diffusers}", flush=True)
    print(
        f"\n{params:.1f} B-parameter Wan 2.2 A14B expert ({args.blocks} of 40 blocks, full width), "
        f"load average {os.getloadavg()[0]:.1f}\n\n| output | build, cached factors: time / peak RSS "
        "| first build (cold cache) | vs exact | copy (fsync) | build / copy |\n|---|---|---|---|---|---|"
    )
    for output, label in (("folder", "diffusers folder"), ("single", "Wan single file (one expert)")):
        print(f"| {label} | {rows[output]} |")
    print(f"\ndiffusers flow: {diffusers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
