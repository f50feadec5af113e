"""A grid calls its pipeline with prompts only: on a base whose pipeline needs an input image
(img2img, inpaint, edit, image-to-video) it is refused at compile time, in every family.

Before this check an SD img2img folder with a grid built everything and then failed inside diffusers
("Input is in incorrect format") as an internal error. A local SD folder of a width neither SD 1.x
nor 2.x has (the tiny ones here) has no known family: it is judged by the class name alone. The expectation is computed here from each
class name, not from the family tables: every built-in family's img2img/inpaint classes must be refused
and its text-to-image class must not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lorarecipe.builtin.materialize import builtin_base_path
from lorarecipe.families import FAMILIES
from tests.helpers.recipes import compile_text, messages, problems_of

BUILTINS = {  # family -> its built-in base
    "sd1": "tiny-sd",
    "sdxl": "tiny-sdxl",
    "sd3": "tiny-sd3",
    "flux": "tiny-flux",
    "chroma": "tiny-chroma",
    "qwen_image": "tiny-qwen-image",
    "z_image": "tiny-z-image",
}
CASES = [
    (family, cls)
    for family, base in BUILTINS.items()
    for cls in FAMILIES[family].pipeline_classes
    if "Img2Img" in cls or "Inpaint" in cls or cls == FAMILIES[family].pipeline_class
]
RECIPE = """\
base: {path: base}
adapters: {one: {file: one.safetensors}}
outputs:
  grid: {kind: grid, path: g.png, prompts: [a cat], variants: [base], steps: 1}
"""


def _base_as(tmp_path: Path, family: str, cls: str) -> None:
    """The family's built-in base under another pipeline class, and a one-module PEFT LoRA for it."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(builtin_base_path(BUILTINS[family]), tmp_path / "base")
    denoiser = FAMILIES[family].denoiser
    weights: dict[str, torch.Tensor] = {}
    for file in sorted((tmp_path / "base" / denoiser).glob("*.safetensors")):
        weights.update(load_file(str(file)))
    key = next(k for k in sorted(weights) if k.endswith("to_q.weight") and weights[k].ndim == 2)
    out, inp = weights[key].shape
    module = f"{denoiser}.{key.removesuffix('.weight')}"
    save_file(
        {f"{module}.lora_A.weight": torch.ones(1, inp), f"{module}.lora_B.weight": torch.ones(out, 1)},
        str(tmp_path / "one.safetensors"),
    )
    index_path = tmp_path / "base" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = cls
    index_path.write_text(json.dumps(index))


def test_every_family_with_a_builtin_is_covered() -> None:
    assert {family for family, _ in CASES} == set(BUILTINS)
    assert sum("Img2Img" in cls for _, cls in CASES) >= len(BUILTINS) - 1  # Chroma, FLUX.1, SD, …


@pytest.mark.parametrize(("family", "cls"), CASES, ids=[c for _, c in CASES])
def test_a_grid_on_an_image_input_pipeline_is_refused(family: str, cls: str, tmp_path: Path) -> None:
    _base_as(tmp_path, family, cls)
    needs_image = "Img2Img" in cls or "Inpaint" in cls
    if not needs_image:
        compile_text(tmp_path, RECIPE)  # the text-to-image class renders grids
        return
    found = messages([p for p in problems_of(tmp_path, RECIPE) if p.severity == "error"])
    assert len(found) == 1, found
    assert found[0].startswith(f"outputs.grid.kind: the base is a {cls}, which "), found[0]
    assert "grids render from prompts only" in found[0]
