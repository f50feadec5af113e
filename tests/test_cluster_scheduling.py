"""The Ray scheduler's choices and the --ray command line, without a cluster (fast)."""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lorarecipe.cli import main
from lorarecipe.gitops.cluster import _pick, _Slot
from tests.helpers.recipes import DEMO_LIKE, write_recipe


@dataclass(frozen=True)
class Job:  # what the scheduler reads of a BuildJob
    name: str
    group: tuple[Any, ...]
    out: Path


def _slot(group: str | None, busy: bool = False) -> _Slot:
    slot = _Slot(actor=None)
    slot.group, slot.busy = ((group,) if group else None), busy
    return slot


def test_a_free_worker_takes_its_warm_base_then_a_base_nobody_holds() -> None:
    jobs = [Job(n, (g,), Path(f"/out/{n}")) for n, g in [("a1", "A"), ("b1", "B"), ("a2", "A"), ("c1", "C")]]
    warm_on_b, busy_on_a = _slot("B"), _slot("A", busy=True)
    pending: deque[Any] = deque(jobs)
    assert _pick(pending, warm_on_b, [warm_on_b, busy_on_a], set()).name == "b1"  # its own base
    assert (
        _pick(pending, warm_on_b, [warm_on_b, busy_on_a], set()).name == "c1"
    )  # not A: another worker holds it
    assert _pick(pending, warm_on_b, [warm_on_b, busy_on_a], set()).name == "a1"  # then anything
    assert [j.name for j in pending] == ["a2"]


def test_two_builds_into_one_output_folder_never_run_at_once() -> None:
    same = Path("/out/same")
    pending: deque[Any] = deque([Job("x", ("A",), same), Job("y", ("A",), Path("/out/y"))])
    slot = _slot("A")
    assert _pick(pending, slot, [slot], {str(same)}).name == "y"
    assert _pick(pending, slot, [slot], {str(same)}) is None


def test_ray_options_without_ray_and_a_missing_ray_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(tmp_path, DEMO_LIKE)
    assert main(["build", str(recipe), "--out", str(tmp_path / "out"), "--workers", "2"]) == 2
    assert "apply to --ray builds only" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    assert main(["build", str(recipe), "--out", str(tmp_path / "out"), "--ray", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'lorarecipe[ray]'" in err and "Traceback" not in err
