"""Problems -> text an editor or CI can jump to.

Three renderings of the same :class:`~lorarecipe.errors.Problem` list: compiler-style text with a
snippet and a caret (``file:line:col: error: path: message``), JSON documents, and GitHub Actions
``::error file=…,line=…,col=…::`` annotations. Also ``did_you_mean`` (stdlib difflib) for hints.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from .errors import Problem

__all__ = ["did_you_mean", "render_github", "render_text"]


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """'did you mean …?' for the closest candidate, or None."""
    choices = sorted(set(candidates))
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return None


def _header(problem: Problem) -> str:
    where = ""
    if problem.span is not None:
        where = f"{problem.span.file}:{problem.span.line}:{problem.span.col}: "
    path = f"{problem.path}: " if problem.path else ""
    return f"{where}{problem.severity}: {path}{problem.message}"


_SNIPPET = 160


def _window(line: str, col: int) -> tuple[str, int]:
    """At most ~160 columns of a long line around ``col``; returns the text and the new column."""
    if len(line) <= _SNIPPET:
        return line, col
    start = max(0, min(col - 40, len(line) - _SNIPPET))
    text = line[start : start + _SNIPPET]
    prefix = "…" if start else ""
    return prefix + text + ("…" if start + _SNIPPET < len(line) else ""), col - start + len(prefix)


def render_text(problems: Iterable[Problem], source: str | None = None) -> str:
    """Compiler-style text; with ``source`` (the file's text) adds a snippet and a caret."""
    lines_of = source.splitlines() if source is not None else []
    chunks: list[str] = []
    for problem in problems:
        out = [_header(problem)]
        span = problem.span
        if span is not None and 0 < span.line <= len(lines_of):
            text, col = _window(lines_of[span.line - 1], span.col)
            gutter = f"{span.line:>5} | "
            out.append(f"{gutter}{text}")
            width = 1
            if span.end_line == span.line and span.end_col and span.end_col > span.col:
                width = span.end_col - span.col
            width = max(1, min(width, max(1, len(text) - col + 1)))
            pad = " " * (len(gutter) - 2) + "| " + " " * (col - 1)
            out.append(f"{pad}{'^' * width}" + (f" {problem.hint}" if problem.hint else ""))
        elif problem.hint:
            out.append(f"      = hint: {problem.hint}")
        chunks.append("\n".join(out))
    return "\n".join(chunks)


def _gh_escape(text: str, prop: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def render_github(problems: Iterable[Problem]) -> str:
    """GitHub Actions workflow commands, one ``::error …::`` line per problem."""
    out = []
    for problem in problems:
        level = "warning" if problem.severity == "warning" else "error"
        props = []
        if problem.span is not None:
            props.append(f"file={_gh_escape(problem.span.file, True)}")
            props.append(f"line={problem.span.line}")
            props.append(f"col={problem.span.col}")
            if problem.span.end_line == problem.span.line and problem.span.end_col:
                props.append(f"endColumn={problem.span.end_col}")
        props.append("title=lorarecipe")
        message = f"{problem.path}: {problem.message}" if problem.path else problem.message
        if problem.hint:
            message += f" ({problem.hint})"
        out.append(f"::{level} {','.join(props)}::{_gh_escape(message)}")
    return "\n".join(out)
