"""Progress reporting through one small interface (rich on a terminal, silent otherwise).

The core calls ``reporter.step(label)``/``advance()``; it never touches rich or tqdm directly, so
quiet mode, CI logs and tests need no special cases. diffusers' own tqdm bars are switched off.
How many steps a build takes is only known as it runs (cells found in the cache are not rendered, an
executor may hand an output on), so no total is promised up front: the closing line counts the steps
that were printed.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

from ..diagnostics import printable

__all__ = ["Reporter", "make_reporter"]


class Reporter(Protocol):
    def begin(self, title: str, total: int | None = None) -> None: ...
    def step(self, label: str) -> None: ...
    def log(self, message: str) -> None: ...
    def end(self) -> None: ...


class SilentReporter:
    def begin(self, title: str, total: int | None = None) -> None:
        pass

    def step(self, label: str) -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def end(self) -> None:
        pass


class LineReporter:
    """Plain lines on stderr (not a terminal, e.g. CI logs): the title, one line per step, and a
    closing line with the number of step lines printed."""

    def __init__(self) -> None:
        self.title, self.steps = "", 0

    def begin(self, title: str, total: int | None = None) -> None:
        self.title, self.steps = title, 0
        print(printable(title), file=sys.stderr)

    def step(self, label: str) -> None:
        self.steps += 1
        print(f"  {printable(label)}", file=sys.stderr)

    def log(self, message: str) -> None:
        print(f"  {printable(message)}", file=sys.stderr)

    def end(self) -> None:
        print(f"{self.title}: done, {self.steps} steps", file=sys.stderr)


class RichReporter:
    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=False,
        )
        self._task: Any = None

    def begin(self, title: str, total: int | None = None) -> None:
        self._progress.start()
        self._task = self._progress.add_task(_rich_text(title), total=total)

    def step(self, label: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=1, description=_rich_text(label))

    def log(self, message: str) -> None:
        self._progress.console.print(_rich_text(message))

    def end(self) -> None:
        if self._task is not None:  # the total is known now: the steps done
            done = self._progress.tasks[0].completed
            self._progress.update(self._task, total=done, description="done")
        self._progress.stop()


def _rich_text(text: str) -> str:
    """Untrusted text for rich: escaped like every text output, and its ``[markup]`` taken literally."""
    from rich.markup import escape

    return escape(printable(text))


def make_reporter(quiet: bool, lines: bool = False) -> Reporter:
    """Silent when quiet, rich on a terminal, plain lines otherwise (if ``lines``)."""
    if quiet:
        return SilentReporter()
    if sys.stderr.isatty():
        return RichReporter()
    return LineReporter() if lines else SilentReporter()
