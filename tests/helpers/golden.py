"""Golden files: a test compares its text with a checked-in file, and a missing file is a failure.

``LORARECIPE_UPDATE_GOLDEN=1 pytest …`` (re)writes the files instead; review the diff and commit it.
Without that opt-in a missing golden file fails the test, so a deleted or renamed golden can never
turn a comparison into a test that passes on anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

__all__ = ["UPDATE_ENV", "assert_golden"]

UPDATE_ENV = "LORARECIPE_UPDATE_GOLDEN"


def assert_golden(text: str, golden: Path) -> None:
    """``text`` equals the golden file's content; with ``LORARECIPE_UPDATE_GOLDEN=1`` writes it first."""
    if os.environ.get(UPDATE_ENV) == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    if not golden.is_file():
        pytest.fail(f"golden file {golden} is missing; create it with {UPDATE_ENV}=1 and review it")
    assert text == golden.read_text(encoding="utf-8")
