"""Run the CLI in-process in tests and keep what it printed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorarecipe.cli import main

LOCATED = re.compile(r"recipe\.yaml:\d+:\d+: error: ")


class Cli:
    """Runs the CLI in-process and keeps what it printed."""

    def __init__(self, capsys: pytest.CaptureFixture[str], folder: Path) -> None:
        self.capsys, self.folder = capsys, folder
        self.text = ""

    def __call__(self, *argv: str) -> int:
        self.capsys.readouterr()
        code = main(list(argv))
        out, err = self.capsys.readouterr()
        self.text = out + err
        return code

    def recipe(self, text: str, name: str = "recipe.yaml") -> Path:
        path = self.folder / name
        path.write_text(text, encoding="utf-8")
        return path

    def build(self, text: str, *extra: str) -> int:
        return self("build", str(self.recipe(text)), "--out", str(self.folder / "out"), "--quiet", *extra)

    def refused(self, code: int, *needles: str, located: bool = True) -> None:
        """Exit 1, a compiler-style located message containing every needle, no traceback."""
        assert code == 1, self.text
        assert "Traceback" not in self.text and "internal error" not in self.text, self.text
        for needle in needles:
            assert needle in self.text, f"{needle!r} not in:\n{self.text}"
        if located:
            assert LOCATED.search(self.text), f"no file:line:col in:\n{self.text}"
