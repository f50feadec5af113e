"""LyCORIS/DoRA fuses against independent oracles: algorithms × layouts × executors, one table.

    python benchmarks/lycoris_oracle.py [--json]

Offline, CPU, ~10 s warm (tiny built-in bases; not part of CI — the same math is asserted, with
tolerances, by tests/test_lycoris_fuse.py and tests/test_extract.py; this prints the numbers).

For each key layout — kohya (``lora_unet_…``/``lora_te_…``), LyCORIS (``lycoris_…``) and
diffusers/PEFT (``unet.…lora_A.weight``, ``hada_*``/``lokr_*``, ``lora_magnitude_vector``, rank and
alpha in ``lora_adapter_metadata``) — one file holds every algorithm that layout has, each on its own
modules of ``builtin:tiny-sd`` (UNet linear, 1×1 and 3×3 convs, CLIP text encoder), with random factors
in the shapes the trainers store (``tests/helpers/lycoris_files.py``). The file is built with
``lorarecipe build`` (library API, ``tests/helpers/recipes.build_text``) at adapter weight 0.8 and
``lora_scale`` 0.9 on both executors — ``streaming`` and ``diffusers`` (the pipeline route) — and every
fused weight is compared with the oracle: ΔW from ``lycoris.functional`` (lycoris-lora, the trainers'
own rebuild), DoRA re-normalized with plain float64 loops, W + s·ΔW (or W + s·(W' − W)) in float64.
Weights no adapter touches must come out bit-identical to the base (counted, reported if not).

Also: an SDXL file in kohya's SGM block names (both text encoders), a FLUX.1 file in BFL names whose
LoKr/LoHa ΔW over the fused ``img_attn.qkv``/``linear1`` is split by rows onto diffusers' to_q/to_k/
to_v(/proj_mlp), and ``extract`` (pipeline route): at full rank the written LoRA's ΔW against the
combined oracle delta (relative Frobenius error), at rank 2 the error against the SVD tail energy
(Eckart–Young, float64 singular values).

Prints a markdown table (``--json``: every module's numbers). Cells are max |W_fused − W_oracle|
over the row's modules and both executors (float32 fuse vs float64 oracle, |W| ≲ 2); the last
column is max |W_streaming − W_pipeline|.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lorarecipe.builtin.materialize import builtin_base_path  # noqa: E402
from tests.helpers.lora_math import lora_deltas  # noqa: E402
from tests.helpers.lycoris_files import (  # noqa: E402
    Module,
    adapter_metadata,
    add_dora,
    dora_reference,
    expected_weight,
    make_module,
    state_dict,
    weights_of,
)
from tests.helpers.recipes import build_text  # noqa: E402

LAYOUTS = {"kohya": "kohya", "lycoris": "LyCORIS", "diffusers": "diffusers/PEFT"}
WEIGHT, LORA_SCALE = 0.8, 0.9
STRENGTH = WEIGHT * LORA_SCALE
SD = ("unet", "text_encoder")
_A = "down_blocks.0.attentions.0.transformer_blocks.0."
_M = "mid_block.attentions.0.transformer_blocks.0."

#: row -> (label, layouts it does not exist in -> footnote)
ROWS: dict[str, tuple[str, dict[str, str]]] = {
    "lora": ("LoRA / LoCon (linear, 1×1, 3×3 conv)", {}),
    "locon-tucker": ("LoCon Tucker (`lora_mid`)", {"diffusers": "peft-tucker"}),
    "loha": ("LoHa (linear, flat 3×3 conv)", {}),
    "loha-tucker": ("LoHa Tucker (`hada_t1/t2`)", {}),
    "lokr-full": ("LoKr full", {}),
    "lokr-conv4d": ("LoKr 4-D conv factor (`lokr_w2` k×k)", {}),
    "lokr-decomposed": ("LoKr decomposed (linear, flat 3×3 W2)", {}),
    "lokr-tucker": ("LoKr Tucker (`lokr_t2`)", {}),
    "lokr-old-order": ("LoKr old order (larger factor first)", {"diffusers": "peft-order"}),
    "dora-row": ("DoRA `dora_scale` per output row", {"diffusers": "peft-dora"}),
    "dora-column": ("DoRA `dora_scale` per input column", {"diffusers": "peft-dora"}),
    "dora-peft": ("DoRA PEFT `lora_magnitude_vector`", {"kohya": "dora-scale", "lycoris": "dora-scale"}),
}
FOOTNOTES = {
    "peft-tucker": "PEFT's LoRA has no Tucker core (`lora_mid`); no PEFT/diffusers file holds one.",
    "peft-order": "PEFT factorizes each dimension itself, smaller factor first; only old LyCORIS "
    "files store the larger one first.",
    "peft-dora": "PEFT/diffusers files store DoRA as `lora_magnitude_vector` (next row), not `dora_scale`.",
    "dora-scale": "kohya/LyCORIS/OneTrainer files store DoRA as `dora_scale` (rows above).",
}
#: row -> modules of tiny-sd: (component, module, weight shape, algorithm, DoRA axis)
SD_CASES: dict[str, list[tuple[str, str, tuple[int, ...], str, str | None]]] = {
    "lora": [
        ("unet", _A + "attn1.to_q", (32, 32), "lora", None),
        ("unet", "down_blocks.0.attentions.0.proj_in", (32, 32, 1, 1), "lora", None),
        ("unet", "down_blocks.0.resnets.0.conv1", (32, 32, 3, 3), "lora", None),
        ("text_encoder", "encoder.layers.0.self_attn.q_proj", (32, 32), "lora", None),
    ],
    "locon-tucker": [("unet", "down_blocks.0.resnets.0.conv2", (32, 32, 3, 3), "locon-tucker", None)],
    "loha": [
        ("unet", _A + "ff.net.0.proj", (256, 32), "loha", None),
        ("unet", "down_blocks.0.downsamplers.0.conv", (32, 32, 3, 3), "loha", None),
        ("text_encoder", "encoder.layers.0.mlp.fc1", (37, 32), "loha", None),
    ],
    "loha-tucker": [("unet", "mid_block.resnets.0.conv1", (64, 64, 3, 3), "loha-tucker", None)],
    "lokr-full": [
        ("unet", _A + "attn1.to_k", (32, 32), "lokr-full", None),
        ("text_encoder", "encoder.layers.0.self_attn.k_proj", (32, 32), "lokr-full", None),
    ],
    "lokr-conv4d": [("unet", "down_blocks.1.resnets.0.conv2", (64, 64, 3, 3), "lokr-full", None)],
    "lokr-decomposed": [
        ("unet", _A + "attn1.to_v", (32, 32), "lokr-decomposed", None),
        ("unet", "down_blocks.1.resnets.0.conv1", (64, 32, 3, 3), "lokr-decomposed", None),
    ],
    "lokr-tucker": [("unet", "mid_block.resnets.0.conv2", (64, 64, 3, 3), "lokr-tucker", None)],
    "lokr-old-order": [
        ("unet", _A + "attn2.to_q", (32, 32), "old", None),
        ("unet", "mid_block.resnets.1.conv1", (64, 64, 3, 3), "old", None),
    ],
    "dora-row": [
        ("unet", _A + "attn2.to_k", (32, 32), "lora", "row"),
        ("unet", _M + "attn1.to_v", (64, 64), "lokr-decomposed", "row"),
        ("unet", "down_blocks.0.attentions.0.proj_out", (32, 32, 1, 1), "lora", "row"),
    ],
    "dora-column": [
        ("unet", _A + "attn2.to_v", (32, 32), "lora", "column"),
        ("text_encoder", "encoder.layers.0.self_attn.out_proj", (32, 32), "loha", "column"),
        ("unet", "mid_block.resnets.1.conv2", (64, 64, 3, 3), "lora", "column"),
    ],
    "dora-peft": [
        ("unet", _A + "attn2.to_out.0", (32, 32), "lora", "row"),
        ("text_encoder", "encoder.layers.0.self_attn.v_proj", (32, 32), "lora", "row"),
        ("unet", _M + "attn1.to_q", (64, 64), "lora", "row"),
    ],
}


@dataclass
class Measured:
    """One module's worst differences: fused (each executor) vs the oracle, and executor vs executor."""

    row: str
    layout: str
    weight: str
    streaming: float
    pipeline: float
    between: float


def old_order_module(component: str, module: str, shape: tuple[int, ...], seed: int) -> Module:
    """A LoKr stored as old LyCORIS files did, larger factor first, both factors decomposed (rank 2,
    α 3; on a k×k conv the kernel spread over both factors' columns); ΔW from lycoris.functional."""
    from lycoris.functional import lokr  # type: ignore[import-untyped]

    out, flat_in = shape[0], math.prod(shape[1:])
    a, c = out // 4, flat_in // (4 if len(shape) == 2 else 12)  # W1 (a, c) ⊗ W2 (4, 4 or 12)
    g = torch.Generator().manual_seed(seed)
    t = {
        "lokr_w1_a": torch.randn(a, 2, generator=g) * 0.3,
        "lokr_w1_b": torch.randn(2, c, generator=g) * 0.3,
        "lokr_w2_a": torch.randn(4, 2, generator=g) * 0.3,
        "lokr_w2_b": torch.randn(2, flat_in // c, generator=g) * 0.3,
    }
    assert a > 4 and c > flat_in // c, "the larger factor first"
    factors = (None, t["lokr_w1_a"], t["lokr_w1_b"], None, t["lokr_w2_a"], t["lokr_w2_b"], None)
    delta = lokr.diff_weight(*factors, gamma=3.0)
    t["alpha"] = torch.tensor(3.0)
    return Module(component, module, shape, "lokr-decomposed", t, delta.double().reshape(shape))


def sd_modules(layout: str) -> dict[str, list[Module]]:
    """row -> its modules with factors and oracle ΔW, for the rows ``layout`` has."""
    out: dict[str, list[Module]] = {}
    for r, (row, cases) in enumerate(SD_CASES.items()):
        if layout in ROWS[row][1]:
            continue
        out[row] = []
        for i, (component, name, shape, algorithm, dora) in enumerate(cases):
            seed = 1000 * r + 100 * i
            if algorithm == "old":
                module = old_order_module(component, name, shape, seed)
            else:
                module = make_module(component, name, shape, algorithm, seed=seed)
            if dora:
                add_dora(module, dora, seed=seed + 50, peft=row == "dora-peft")
            if layout == "diffusers" and algorithm == "lokr-full":
                assert module.delta is not None  # PEFT's LoKr scales by α/r (3/2) even for full factors
                module.delta = module.delta * 1.5
            out[row].append(module)
    return out


def build_both(
    folder: Path, recipe: str, components: tuple[str, ...]
) -> dict[str, dict[str, dict[str, Any]]]:
    """``recipe`` built by each executor -> executor -> component -> fused weights."""
    fused: dict[str, dict[str, dict[str, Any]]] = {}
    for executor in ("streaming", "diffusers"):
        build_text(folder, textwrap.dedent(recipe), out=executor, executor=executor)
        manifest = json.loads((folder / executor / "manifest.json").read_text())
        assert manifest["outputs"]["fused"]["executor"] == executor, manifest["outputs"]["fused"]
        fused[executor] = {c: weights_of(folder / executor / "fused", c) for c in components}
    return fused


def compare(
    fused: dict[str, dict[str, dict[str, Any]]],
    base: dict[str, dict[str, torch.Tensor]],
    expected: dict[tuple[str, str], tuple[str, torch.Tensor]],
    layout: str,
) -> tuple[list[Measured], list[str]]:
    """Each expected weight's differences, and the weights changed that no module should change."""
    measured, stray = [], []
    stream, pipe = fused["streaming"], fused["diffusers"]
    for component, weights in stream.items():
        for key, got in weights.items():
            other = pipe[component][key]
            if (component, key) not in expected:
                if not (torch.equal(got, base[component][key]) and torch.equal(other, base[component][key])):
                    stray.append(f"{layout}: {component}.{key}")
                continue
            row, want = expected[(component, key)]
            measured.append(
                Measured(
                    row,
                    layout,
                    f"{component}.{key}",
                    float((got.double() - want).abs().max()),
                    float((other.double() - want).abs().max()),
                    float((got - other).abs().max()),
                )
            )
    missing = {f"{c}.{k}" for c, k in expected} - {m.weight for m in measured}
    assert not missing, sorted(missing)
    return measured, stray


def sd_layout(work: Path, layout: str) -> tuple[list[Measured], list[str]]:
    folder = work / f"sd-{layout}"
    folder.mkdir()
    rows = sd_modules(layout)
    modules = [m for ms in rows.values() for m in ms]
    metadata = adapter_metadata(SD, 2, 3.0) if layout == "diffusers" else {}
    save_file(state_dict(modules, layout), str(folder / "lyco.safetensors"), metadata=metadata)
    recipe = f"""\
        base: builtin:tiny-sd
        adapters: {{lyco: {{file: lyco.safetensors}}}}
        set_adapters: {{adapters: {{lyco: {WEIGHT}}}}}
        fuse: {{lora_scale: {LORA_SCALE}}}
        outputs: {{fused: {{kind: pipeline, path: fused, card: false}}}}
        """
    fused = build_both(folder, recipe, SD)
    base = {c: weights_of(builtin_base_path("tiny-sd"), c) for c in SD}
    expected = {
        (m.component, f"{m.module}.weight"): (
            row,
            expected_weight(base[m.component][f"{m.module}.weight"], [(m, STRENGTH)]),
        )
        for row, ms in rows.items()
        for m in ms
    }
    return compare(fused, base, expected, layout)


SDXL_CASES = [  # (kohya SGM stem, component, diffusers module, shape, algorithm, DoRA axis)
    ("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q", "unet",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (64, 64), "loha", None),
    ("lora_unet_input_blocks_1_0_out_layers_3", "unet", "down_blocks.0.resnets.0.conv2", (32, 32, 3, 3),
     "lokr-tucker", None),
    ("lora_unet_output_blocks_0_0_emb_layers_1", "unet", "up_blocks.0.resnets.0.time_emb_proj", (64, 128),
     "lokr-full", "row"),
    ("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", "text_encoder",
     "encoder.layers.0.self_attn.k_proj", (32, 32), "lora", "column"),
    ("lora_te2_text_model_encoder_layers_1_mlp_fc1", "text_encoder_2", "encoder.layers.1.mlp.fc1", (37, 32),
     "lokr-decomposed", None),
]  # fmt: skip


def sdxl(work: Path) -> tuple[list[Measured], list[str]]:
    folder = work / "sdxl"
    folder.mkdir()
    components = ("unet", "text_encoder", "text_encoder_2")
    tensors, modules = {}, []
    for i, (stem, component, name, shape, algorithm, dora) in enumerate(SDXL_CASES):
        module = make_module(component, name, shape, algorithm, seed=300 + 10 * i)
        if dora:
            add_dora(module, dora, seed=305 + 10 * i)
        modules.append(module)
        tensors.update({f"{stem}.{suffix}": t for suffix, t in module.tensors.items()})
    save_file(tensors, str(folder / "xl.safetensors"))
    recipe = f"""\
        base: builtin:tiny-sdxl
        adapters: {{xl: {{file: xl.safetensors}}}}
        set_adapters: {{adapters: {{xl: {WEIGHT}}}}}
        fuse: {{lora_scale: {LORA_SCALE}}}
        outputs: {{fused: {{kind: pipeline, path: fused, card: false}}}}
        """
    fused = build_both(folder, recipe, components)
    base = {c: weights_of(builtin_base_path("tiny-sdxl"), c) for c in components}
    expected = {}
    for m in modules:  # CLIPTextModelWithProjection's file keeps 'text_model.' in its keys
        key = next(
            k for k in (f"{m.module}.weight", f"text_model.{m.module}.weight") if k in base[m.component]
        )
        expected[(m.component, key)] = ("sdxl", expected_weight(base[m.component][key], [(m, STRENGTH)]))
    return compare(fused, base, expected, "kohya")


_D, _S = "transformer_blocks", "single_transformer_blocks"
FLUX_CASES = {  # BFL module -> (algorithm, fused shape, diffusers parts it holds by rows)
    "double_blocks.0.img_attn.qkv": ("lokr-decomposed", (96, 32), [f"{_D}.0.attn.to_{p}" for p in "qkv"]),
    "double_blocks.1.img_attn.qkv": ("lokr-full", (96, 32), [f"{_D}.1.attn.to_{p}" for p in "qkv"]),
    "single_blocks.1.linear1": (
        "loha",
        (224, 32),
        [f"{_S}.1.attn.to_q", f"{_S}.1.attn.to_k", f"{_S}.1.attn.to_v", f"{_S}.1.proj_mlp"],
    ),
}


def flux(work: Path) -> tuple[list[Measured], list[str]]:
    folder = work / "flux"
    folder.mkdir()
    tensors, modules = {}, {}
    for i, (bfl, (algorithm, shape, _)) in enumerate(FLUX_CASES.items()):
        modules[bfl] = make_module("transformer", bfl, shape, algorithm, seed=400 + 10 * i)
        stem = "lora_unet_" + bfl.replace(".", "_")
        tensors.update({f"{stem}.{suffix}": t for suffix, t in modules[bfl].tensors.items()})
    save_file(tensors, str(folder / "flux.safetensors"))
    recipe = f"""\
        base: builtin:tiny-flux
        adapters: {{f: {{file: flux.safetensors}}}}
        set_adapters: {{adapters: {{f: {WEIGHT}}}}}
        fuse: {{lora_scale: {LORA_SCALE}, components: [transformer]}}
        outputs: {{fused: {{kind: pipeline, path: fused, card: false}}}}
        """
    fused = build_both(folder, recipe, ("transformer",))
    base = {"transformer": weights_of(builtin_base_path("tiny-flux"), "transformer")}
    expected = {}
    for bfl, (_, _, parts) in FLUX_CASES.items():  # the oracle on the stacked weight, split by rows
        stacked = [base["transformer"][f"{p}.weight"] for p in parts]
        whole = expected_weight(torch.cat(stacked), [(modules[bfl], STRENGTH)])
        for part, rows in zip(parts, whole.split([w.shape[0] for w in stacked]), strict=True):
            expected[("transformer", f"{part}.weight")] = ("flux", rows)
    return compare(fused, base, expected, "kohya")


def tail_error(delta: torch.Tensor, rank: int) -> float:
    """Eckart–Young: ‖ΔW − best rank-r‖_F / ‖ΔW‖_F = sqrt(Σ_{i>r} σᵢ² / Σ σᵢ²), float64."""
    s = torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))
    return math.sqrt(float((s[rank:] ** 2).sum()) / float((s**2).sum()))


def extraction(work: Path) -> dict[str, Any]:
    """Every kohya-layout module extracted at full rank (64) and at rank 2, against the oracle's ΔW."""
    folder = work / "extract"
    folder.mkdir()
    modules = [m for ms in sd_modules("kohya").values() for m in ms]
    save_file(state_dict(modules, "kohya"), str(folder / "lyco.safetensors"))
    recipe = f"""\
        base: builtin:tiny-sd
        adapters: {{lyco: {{file: lyco.safetensors}}}}
        merges:
          full: {{method: extract, adapters: {{lyco: {WEIGHT}}}, svd_rank: 64}}
          low: {{method: extract, adapters: {{lyco: {WEIGHT}}}, svd_rank: 2}}
        outputs:
          full: {{kind: lora, adapter: full, path: full, layout: kohya}}
          low: {{kind: lora, adapter: low, path: low, layout: kohya}}
        """
    build_text(folder, textwrap.dedent(recipe), out="out")
    base = {c: weights_of(builtin_base_path("tiny-sd"), c) for c in SD}
    combined = {}
    for m in modules:
        assert m.delta is not None
        weight = base[m.component][f"{m.module}.weight"].double()
        combined[(m.component, f"{m.module}.weight")] = WEIGHT * (
            m.delta if m.dora is None else dora_reference(weight, m.delta, *m.dora) - weight
        )
    full = lora_deltas(folder / "out" / "full" / "full.safetensors", base)
    low = lora_deltas(folder / "out" / "low" / "low.safetensors", base)
    report = json.loads((folder / "out" / "manifest.json").read_text())["checks"]["extract"]
    assert full.keys() == low.keys() == combined.keys(), sorted(full.keys() ^ combined.keys())
    out: dict[str, Any] = {"modules": len(combined), "full_relative_error": 0.0, "low_measured_vs_tail": 0.0}
    out["full_reported"] = report["full"]["max_relative_error"]
    out["low_reported_vs_tail"] = 0.0
    for (component, key), want in combined.items():
        norm = float(want.norm())
        out["full_relative_error"] = max(
            out["full_relative_error"],
            float((full[(component, key)].reshape(want.shape) - want).norm()) / norm,
        )
        tail = tail_error(want, 2)
        measured = float((low[(component, key)].reshape(want.shape) - want).norm()) / norm
        reported = report["low"]["modules"][f"{component}.{key.removesuffix('.weight')}"]["relative_error"]
        out["low_measured_vs_tail"] = max(out["low_measured_vs_tail"], abs(measured - tail))
        out["low_reported_vs_tail"] = max(out["low_reported_vs_tail"], abs(reported - tail))
    return out


def _number(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def table(measured: list[Measured], stray: list[str], extract: dict[str, Any]) -> str:
    """The markdown table of the module docstring, footnotes and the extraction lines."""
    marks = {note: f"[^{i}]" for i, note in enumerate(FOOTNOTES, 1)}
    lines = [
        "| algorithm | " + " | ".join(LAYOUTS.values()) + " | streaming ↔ pipeline |",
        "|---|" + "---|" * (len(LAYOUTS) + 1),
    ]
    rows = {**{row: label for row, (label, _) in ROWS.items()},
            "sdxl": "SDXL, SGM block names (LoHa, LoKr Tucker/full/decomposed, DoRA, both TEs)",
            "flux": "FLUX.1, BFL names: LoKr/LoHa on fused `qkv`/`linear1`, split by rows"}  # fmt: skip
    for row, label in rows.items():
        cells, between = [], 0.0
        for layout in LAYOUTS:
            found = [m for m in measured if m.row == row and m.layout == layout]
            if found:
                cells.append(f"{_number(max(max(m.streaming, m.pipeline) for m in found))} ({len(found)})")
                between = max(between, *(m.between for m in found))
            elif layout in ROWS.get(row, ("", {}))[1]:
                cells.append(f"—{marks[ROWS[row][1][layout]]}")
            else:
                cells.append("")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_number(between)} |")
    lines += [
        "",
        "Cells: max |W_fused − W_oracle| over the row's modules (their count in parentheses) and both "
        f"executors; adapter weight {WEIGHT} × lora_scale {LORA_SCALE}. Weights no module touches "
        + ("bit-identical to the base." if not stray else f"CHANGED: {', '.join(stray)}."),
        "",
        f"`extract` ({extract['modules']} modules of the kohya file, every row above): full rank, max "
        f"‖ΔW_lora − ΔW_oracle‖/‖ΔW_oracle‖ = {_number(extract['full_relative_error'])} "
        f"(manifest: {_number(extract['full_reported'])}); rank 2, max |error − SVD tail energy| = "
        f"{_number(extract['low_measured_vs_tail'])} measured, {_number(extract['low_reported_vs_tail'])} "
        "as the manifest reports it.",
        "",
        *(f"{marks[note]}: {text}" for note, text in FOOTNOTES.items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print every module's numbers as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    measured: list[Measured] = []
    stray: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lycoris-oracle-") as tmp:
        work = Path(tmp)
        results = [sd_layout(work, layout) for layout in LAYOUTS] + [sdxl(work), flux(work)]
        for found, changed in results:
            measured += found
            stray += changed
        extract = extraction(work)
    if args.json:
        doc = {"modules": [vars(m) for m in measured], "untouched_changed": stray, "extract": extract}
        print(json.dumps(doc, indent=1))
    else:
        print(table(measured, stray, extract))
    return 1 if stray else 0


if __name__ == "__main__":
    raise SystemExit(main())
