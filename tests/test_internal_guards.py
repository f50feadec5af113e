"""The executors' internal guards fire: each check is triggered by corrupting the computation it
watches, and the build fails with its message (a guard no test can trigger proves nothing).

- pipeline route, after ``fuse_lora``: a weight no fused adapter targets changed / a targeted weight
  was left unchanged (``runner/pipeline/fuse.py``);
- streaming route: its terms differ from the scalings PEFT holds (``runner/streaming/skeleton.py``);
  a fused LoRA module maps to no tensor of the output (``runner/streaming/stream.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from lorarecipe.errors import BuildError
from lorarecipe.runner.streaming import skeleton, stream
from lorarecipe.runner.streaming.factor_cache import FactorCache
from tests.helpers.recipes import build_text

RECIPE = """\
base: builtin:tiny-sd
adapters:
  style: builtin:tiny-sd/style
  detail: builtin:tiny-sd/detail
set_adapters: {adapters: {style: 0.7, detail: 0.5}}
fuse: {lora_scale: 0.9}
outputs:
  fused: {kind: pipeline, path: fused}
"""


def _fuse_then(monkeypatch: pytest.MonkeyPatch, after: Any) -> None:
    """Run diffusers' own ``fuse_lora``, then ``after(pipe, snapshot)`` (snapshot: the UNet's
    parameters before the fuse)."""
    from diffusers import StableDiffusionPipeline

    original = StableDiffusionPipeline.fuse_lora

    def fuse_lora(self: Any, *args: Any, **kwargs: Any) -> Any:
        snapshot = {n: p.detach().clone() for n, p in self.unet.named_parameters()}
        result = original(self, *args, **kwargs)
        with torch.no_grad():
            after(self, snapshot)
        return result

    monkeypatch.setattr(StableDiffusionPipeline, "fuse_lora", fuse_lora)


def test_a_weight_no_adapter_targets_that_changed_fails_the_fuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fuse_then(monkeypatch, lambda pipe, _: pipe.unet.conv_in.weight.add_(1.0))
    with pytest.raises(
        BuildError, match=r"fuse changed 1 weights of unet that no fused adapter targets: conv_in"
    ):
        build_text(tmp_path, RECIPE, executor="diffusers")
    assert not (tmp_path / "out" / "fused").exists()


def test_a_targeted_weight_left_unchanged_fails_the_fuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def undo_one(pipe: Any, snapshot: dict[str, torch.Tensor]) -> None:
        name = next(n for n in snapshot if n.endswith("to_q.base_layer.weight"))
        dict(pipe.unet.named_parameters())[name].copy_(snapshot[name])

    _fuse_then(monkeypatch, undo_one)
    with pytest.raises(
        BuildError, match=r"fuse left 1 weights of unet unchanged although a fused adapter applies"
    ):
        build_text(tmp_path, RECIPE, executor="diffusers")


def test_streaming_terms_that_differ_from_peft_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream's own terms (from the factors) are cross-checked against PEFT's scalings."""
    original = skeleton.targets_from_factors

    def off_by_one_scaling(*args: Any, **kwargs: Any) -> Any:
        targets = original(*args, **kwargs)
        key = next(iter(targets))
        first, *rest = targets[key].terms
        wrong = dataclasses.replace(first, scaling=first.scaling * 1.0001)
        return {**targets, key: dataclasses.replace(targets[key], terms=(wrong, *rest))}

    monkeypatch.setattr(FactorCache, "load", lambda self, adapters: None)  # decide on the skeleton
    monkeypatch.setattr(skeleton, "targets_from_factors", off_by_one_scaling)
    with pytest.raises(
        BuildError, match="internal: the streaming fuser's terms differ from what PEFT would merge"
    ):
        build_text(tmp_path, RECIPE, executor="streaming")


def test_a_fused_module_without_an_output_tensor_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target the writer never meets would be dropped silently: refused after writing."""
    original = stream._rekey

    def with_a_ghost(targets: Any, base: Any) -> Any:
        found = original(targets, base)
        some = next(iter(found.values()))
        return {**found, ("unet", "ghost_block.weight"): dataclasses.replace(some, module_name="ghost_block")}

    monkeypatch.setattr(stream, "_rekey", with_a_ghost)
    with pytest.raises(
        BuildError, match=r"1 fused LoRA modules map to no tensor of the output .*unet\.ghost_block"
    ):
        build_text(tmp_path, RECIPE, executor="streaming")
    assert not (tmp_path / "out" / "fused").exists()
