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

REPO = Path(__file__).resolve().parents[1]
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
  components: [transformer]
outputs:
  {output}
"""
OUTPUTS = {
    "folder": "fused: {kind: pipeline, path: fused, card: false}",
    "single": "single: {kind: single_file, path: flux1-dev-fused.safetensors}",
}


# ------------------------------------------------------------------------------------------ the base


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
        write_shards(transformer, tmp / "transformer")
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


# -------------------------------------------------------------------------------------------- parent


def _child_run(work: Path, *args: str) -> tuple[float, int, int, dict[str, Any], str]:
    return child_run(__file__, work, *args)


def _build_run(work: Path, output: str, weights: tuple[float, float], scale: float) -> tuple[float, int, str]:
    """One ``lorarecipe build`` process of this benchmark's recipe; (wall seconds, peak RSS, log)."""
    text = RECIPE.format(w1=weights[0], w2=weights[1], scale=scale, output=OUTPUTS[output])
    return build_run(work, output, text)


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
        free_disk(work, int(2 * 2 * params + 5 * 1000**3))  # bfloat16 base + one output + margin
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
            f"{warm[0]:.1f} s / {gib(warm[1])} | {cold[0]:.1f} s / {gib(cold[1])} | "
            f"{check['worst_ulp']:.2f} ulp"
        )
        shutil.rmtree(work / "out-stream", ignore_errors=True)
    free_disk(work, size + 1000**3)
    copy_wall, copy_rss, _, _, _ = _child_run(work, "copy", str(work / "out-copy"))
    shutil.rmtree(work / "out-copy", ignore_errors=True)
    print(f"  copy: {copy_wall:.1f} s, {gib(copy_rss)}", flush=True)
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
