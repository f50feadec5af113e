"""Grids: rendered cells are cached by what they depend on, and images do not depend on the machine's
thread count.

- a rebuild after one mix weight changed renders only the columns that weight reaches (``mix``,
  ``fused`` and its runtime twin), takes the others from the cell cache, and writes files
  byte-identical to a build with an empty cache;
- a grid whose cells are all cached is written without loading any pipeline;
- a damaged cache entry is re-rendered, never trusted;
- the demo's grid is byte-identical when built in processes with 1 and 2 torch threads (grids render
  at the grid's fixed ``threads``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lorarecipe.runner.pipeline.grid_cache as grid_cache
from lorarecipe.plan.view import describe_weight
from lorarecipe.runner.pipeline import load as pipeline_load
from lorarecipe.runner.pipeline.grids import GridRenderer
from tests.helpers.recipes import build_text

REPO = Path(__file__).resolve().parents[1]

RECIPE = """\
base: builtin:tiny-sd
adapters:
  style: {{builtin: tiny-sd/style, trigger_words: [watercolor]}}
  detail: builtin:tiny-sd/detail
set_adapters:
  adapters: {{style: {weight}, detail: {{unet: {{down: 0.5, up: {{block_1: [0.6, 1.0]}}}}, text_encoder: 0.8}}}}
fuse: {{lora_scale: 0.9}}
outputs:
  grid: {{kind: grid, path: g.png, prompts: [a cat, a house], seeds: [0, 1, 2], steps: 2,
          variants: [base, style, detail, mix, fused]}}
"""


def _files(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json" and ".lorarecipe" not in p.parts
    }


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """A private cell cache, and the list of the variants each rendered batch belonged to."""
    monkeypatch.setattr(grid_cache, "cache_root", lambda: tmp_path / "cache")
    rendered: list[str] = []
    original = GridRenderer._render

    def counting(self: GridRenderer, col: object, batch: int) -> list[object]:
        rendered.append(col.variant)  # type: ignore[attr-defined]
        return original(self, col, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(GridRenderer, "_render", counting)
    return rendered


def test_a_changed_weight_renders_only_the_cells_it_reaches(
    renders: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    build_text(tmp_path / "a", RECIPE.format(weight=0.7))
    # 6 rows in batches of 4: 2 batches per column; fused brings its runtime twin
    assert sorted(renders) == sorted(["base", "style", "detail", "mix", "fused", "fused-runtime"] * 2)
    renders.clear()
    (tmp_path / "b").mkdir()
    build_text(tmp_path / "b", RECIPE.format(weight=0.4))
    assert sorted(renders) == sorted(["mix", "fused", "fused-runtime"] * 2)
    # the same build with an empty cache renders everything and writes the same bytes
    monkeypatch.setattr(grid_cache, "cache_root", lambda: tmp_path / "empty-cache")
    renders.clear()
    (tmp_path / "c").mkdir()
    build_text(tmp_path / "c", RECIPE.format(weight=0.4))
    assert len(renders) == 12
    assert _files(tmp_path / "b" / "out") == _files(tmp_path / "c" / "out")
    assert len(_files(tmp_path / "b" / "out")) == 2 + 6 * 5  # grid, sidecar, 6 rows × 5 columns


def test_all_cells_cached_loads_no_pipeline(
    renders: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    build_text(tmp_path / "a", RECIPE.format(weight=0.7))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(pipeline_load, "load_pipeline", refuse)
    renders.clear()
    (tmp_path / "b").mkdir()
    result = build_text(tmp_path / "b", RECIPE.format(weight=0.7))
    assert renders == []
    assert _files(tmp_path / "a" / "out") == _files(tmp_path / "b" / "out")
    assert result.outputs  # the grid was written (from the cache)


def test_a_damaged_entry_is_rendered_again(renders: list[str], tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    build_text(tmp_path / "a", RECIPE.format(weight=0.7))
    entries = sorted((tmp_path / "cache" / "grid-cells").rglob("*.json"))
    assert len(entries) == 10  # 5 visible columns × 2 batches
    entries[0].write_text(entries[0].read_text().replace('"images": ["', '"images": ["AAAA'))
    entries[1].write_bytes(entries[1].read_bytes()[:100])  # truncated
    renders.clear()
    (tmp_path / "b").mkdir()
    build_text(tmp_path / "b", RECIPE.format(weight=0.7))
    assert 2 <= len(renders) <= 4  # the two damaged batches (+ a fused one's runtime twin)
    assert _files(tmp_path / "a" / "out") == _files(tmp_path / "b" / "out")


def test_weights_are_described_readably() -> None:
    assert describe_weight(0.7) == "0.7"
    per_block = (("unet", (("down", 0.5), ("up", (("block_1", (0.6, 1.0)),)))), ("text_encoder", 0.8))
    assert describe_weight(per_block) == "unet(down 0.5, up block_1 0.6/1) text_encoder 0.8"


DEMO_GRID = (REPO / "recipes" / "demo.yaml").read_text().split("outputs:")[0] + (
    "outputs:\n"
    "  grid: {kind: grid, path: grids/demo.png, prompts: ['a photo of a cat', 'a house by the sea'],\n"
    "         seeds: [0, 1], steps: 4, variants: [base, style, detail, style-detail, mix, fused]}\n"
)


@pytest.mark.slow
def test_the_demo_grid_does_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    """Two processes, 1 and 2 torch threads, separate empty caches: the same grid, cells and sidecar."""
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(DEMO_GRID)
    for threads in ("1", "2"):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "LORARECIPE_CACHE": str(tmp_path / threads / "cache"),
            "HF_HOME": str(tmp_path / threads / "hf"),
        }
        code = (
            "import sys, torch; from lorarecipe.cli import main; "
            f"assert torch.get_num_threads() == {threads}, torch.get_num_threads(); "
            f"sys.exit(main(['build', {str(recipe)!r}, '--out', {str(tmp_path / threads / 'out')!r}, '--quiet']))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
        )
        assert result.returncode == 0, result.stderr
    one, two = _files(tmp_path / "1" / "out"), _files(tmp_path / "2" / "out")
    assert len(one) == 2 + 4 * 6 and one == two
