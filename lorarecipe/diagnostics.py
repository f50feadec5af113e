"""Problems -> text an editor or CI can jump to.

Three renderings of the same :class:`~lorarecipe.errors.Problem` list: compiler-style text with a
snippet and a caret (``file:line:col: error: path: message``), JSON documents, and GitHub Actions
``::error file=…,line=…,col=…::`` annotations. Also ``did_you_mean`` (stdlib difflib) for hints.

Messages quote untrusted text (tensor and file names, recipe values, YAML lines). Every text
renderer passes it through :func:`printable`, so nothing read from an input can start a line of a
terminal or CI log, emit an escape sequence, or look like a GitHub Actions workflow command.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from .errors import Problem

__all__ = ["did_you_mean", "printable", "render_github", "render_text", "source_lines"]

#: C0/C1 controls (newlines and ESC included), DEL, line/paragraph separators and the bidirectional
#: controls that reorder what a terminal shows ("Trojan Source").
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
#: What GitHub Actions reads as a workflow command at the start of a line (``::error …``, ``##[…]``).
_COMMAND_START = re.compile(r"^(\s*)(::|##\[)")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
MAX_QUOTED = 1000


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def printable(text: str, limit: int | None = MAX_QUOTED) -> str:
    """Untrusted text -> one line safe for a terminal or CI log: control, separator and bidi
    characters escaped (``\\n``, ``\\x1b``, ``\\u202e``), a leading ``::``/``##[`` escaped, and at
    most ``limit`` characters (``…`` marks a cut)."""
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    text = _UNPRINTABLE.sub(_escape, text)
    return _COMMAND_START.sub(lambda m: m.group(1) + ("\\x3a:" if m.group(2) == "::" else "\\x23#["), text)


def source_lines(source: str) -> list[str]:
    """A file's text -> its lines as YAML counts them (``str.splitlines`` also splits at \\x0b, \\x0c
    and \\x1c-\\x1e, which would put a snippet on the wrong line)."""
    return re.split("\r\n|[\n\r\x85\u2028\u2029]", source)


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
    return printable(f"{where}{problem.severity}: {path}{problem.message}", limit=2 * MAX_QUOTED)


_SNIPPET = 160


def _window(line: str, col: int) -> tuple[str, int]:
    """At most ~160 columns of a long line around ``col``; returns the text and the new column."""
    if len(line) <= _SNIPPET:
        return line, col
    start = max(0, min(col - 40, len(line) - _SNIPPET))
    text = line[start : start + _SNIPPET]
    prefix = "…" if start else ""
    return prefix + text + ("…" if start + _SNIPPET < len(line) else ""), col - start + len(prefix)


def _snippet(line: str, col: int, width: int) -> tuple[str, int, int]:
    """A source line and the caret's 1-based column and width -> the line's window with every piece
    escaped, and the caret's column and width in that text."""
    text, col = _window(line, col)
    before, marked, after = text[: col - 1], text[col - 1 : col - 1 + width], text[col - 1 + width :]
    shown = [printable(part, None) for part in (before, marked, after)]
    return "".join(shown), len(shown[0]) + 1, max(1, len(shown[1]))


def render_text(problems: Iterable[Problem], source: str | None = None) -> str:
    """Compiler-style text; with ``source`` (the file's text) adds a snippet and a caret. Every
    quoted piece goes through :func:`printable`."""
    lines_of = source_lines(source) if source is not None else []
    chunks: list[str] = []
    for problem in problems:
        out = [_header(problem)]
        span = problem.span
        hint = printable(problem.hint) if problem.hint else None
        if span is not None and 0 < span.line <= len(lines_of):
            width = 1
            if span.end_line == span.line and span.end_col and span.end_col > span.col:
                width = span.end_col - span.col
            text, col, width = _snippet(lines_of[span.line - 1], span.col, width)
            gutter = f"{span.line:>5} | "
            out.append(f"{gutter}{text}")
            width = max(1, min(width, max(1, len(text) - col + 1)))
            pad = " " * (len(gutter) - 2) + "| " + " " * (col - 1)
            out.append(f"{pad}{'^' * width}" + (f" {hint}" if hint else ""))
        elif hint:
            out.append(f"      = hint: {hint}")
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
            props.append(f"file={_gh_escape(printable(problem.span.file), True)}")
            props.append(f"line={problem.span.line}")
            props.append(f"col={problem.span.col}")
            if problem.span.end_line == problem.span.line and problem.span.end_col:
                props.append(f"endColumn={problem.span.end_col}")
        props.append("title=lorarecipe")
        message = f"{problem.path}: {problem.message}" if problem.path else problem.message
        if problem.hint:
            message += f" ({problem.hint})"
        out.append(f"::{level} {','.join(props)}::{_gh_escape(printable(message, 2 * MAX_QUOTED))}")
    return "\n".join(out)
