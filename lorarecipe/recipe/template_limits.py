"""How big a template value is, and how big an operation's result would be, before it is built.

Value -> its size in characters (strings, digits of integers, items of containers, counted deeply with
an early stop); ``%``-format, ``str.format`` fields, ``replace``, ``join`` and padding -> the length of
their result, computed from their arguments without building it. ``templating`` refuses an operation
whose result would exceed :data:`MAX_VALUE_CHARS`: a few hundred bytes of recipe must not be able to
ask for gigabytes (``"{:99999999}".format(x)``, ``"%99999999d" % x``, ``s|replace("a", s)``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jinja2.exceptions import SecurityError

__all__ = [
    "MAX_INT_BITS",
    "MAX_OPERATIONS",
    "MAX_POWER_EXPONENT",
    "MAX_RENDERS",
    "MAX_SECONDS",
    "MAX_VALUE_CHARS",
    "Budget",
    "TemplateLimit",
    "format_spec_width",
    "join_length",
    "percent_length",
    "replace_length",
    "require_size",
    "value_size",
]

#: The largest value (and rendered result) a template may build, in characters or items.
MAX_VALUE_CHARS = 10_000
MAX_INT_BITS = 4096
MAX_POWER_EXPONENT = 64
#: Backstops for one recipe file: sandboxed operations, renders, and seconds spent in templates.
MAX_OPERATIONS = 200_000
MAX_RENDERS = 10_000
MAX_SECONDS = 2.0
_NUMBER_CHARS = 330  # the longest float/int rendering before padding: '%f' of 1.8e308 has 309 digits


class TemplateLimit(SecurityError):
    """A template asked for more than a limit allows; the message names the limit."""


def _too_big(what: str, size: int) -> TemplateLimit:
    return TemplateLimit(
        f"{what} would be {size} characters long (limit: {MAX_VALUE_CHARS} characters per value)"
    )


def value_size(value: Any, stop: int = MAX_VALUE_CHARS) -> int:
    """Characters of a str, digits of an int, items plus item sizes of a container (deep, no recursion);
    counting stops just past ``stop``."""
    total = 0
    pending = [value]
    while pending and total <= stop:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, bool) or item is None or isinstance(item, float):
            total += 1
        elif isinstance(item, int):
            total += item.bit_length() * 3 // 10 + 1
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += len(item)
            pending.extend(item)
        elif isinstance(item, Mapping):
            total += len(item)
            pending.extend(item.keys())
            pending.extend(item.values())
        else:
            total += 1
    return total


def require_size(value: Any, what: str) -> Any:
    """``value`` itself, if it is within :data:`MAX_VALUE_CHARS`; else :class:`TemplateLimit`."""
    size = value_size(value)
    if size > MAX_VALUE_CHARS:
        raise _too_big(what, size)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise TemplateLimit(f"{what} would have {value.bit_length()} bits (limit: {MAX_INT_BITS} bits)")
    return value


def _width(digits: str | None, what: str) -> int:
    """A width or precision written in a format; refused beyond the value limit before ``int()``."""
    if not digits:
        return 0
    if len(digits) > 6 or int(digits) > MAX_VALUE_CHARS:
        raise TemplateLimit(f"{what}: width {digits[:12]} is larger than {MAX_VALUE_CHARS} (limit)")
    return int(digits)


def format_spec_width(spec: str) -> int:
    """The largest number in a ``str.format`` field spec (width or precision), checked against the limit."""
    return max((_width(d, "format field") for d in re.findall(r"\d+", spec)), default=0)


_PERCENT = re.compile(
    r"%(?:\((?P<key>[^)]*)\))?[#0\- +]*(?P<width>\*|\d+)?(?:\.(?P<prec>\*|\d*))?[hlL]?(?P<conv>.?)", re.S
)


def _piece(conv: str, arg: Any) -> int:
    if conv in "sra":
        convert: Callable[[Any], str] = str if conv == "s" else repr if conv == "r" else ascii
        shown = convert(arg) if value_size(arg) <= MAX_VALUE_CHARS else ""
        return len(shown) or value_size(arg)
    if isinstance(arg, int) and not isinstance(arg, bool):
        return arg.bit_length() * 3 // 10 + 2 + _NUMBER_CHARS
    return _NUMBER_CHARS


def percent_length(fmt: str, args: Any) -> int:
    """Upper bound of ``len(fmt % args)``; ``*`` widths and widths over the limit are refused."""
    positional = list(args) if isinstance(args, tuple) else [args]
    total, index = len(fmt), 0
    for match in _PERCENT.finditer(fmt):
        total -= len(match[0])  # the spec itself is replaced by its piece
        if match["conv"] == "%":
            total += 1
            continue
        if "*" in (match["width"], match["prec"]):
            raise TemplateLimit("'%' format: '*' widths are not allowed in recipe templates")
        width = max(_width(match["width"], "'%' format"), _width(match["prec"], "'%' format"))
        if match["key"] is not None:
            arg = args.get(match["key"]) if isinstance(args, Mapping) else None
        else:
            arg = positional[index] if index < len(positional) else None
            index += 1
        total += width + _piece(match["conv"], arg)
    if total > MAX_VALUE_CHARS:
        raise _too_big("the '%' format result", total)
    return total


def replace_length(text: str, old: str, new: str, count: int | None = None) -> int:
    """``len(text.replace(old, new, count))`` without replacing."""
    times = text.count(old) if old else len(text) + 1
    if count is not None and count >= 0:
        times = min(times, count)
    return len(text) + times * (len(new) - len(old))


def join_length(separator: str, items: Any) -> int:
    """``len(separator.join(str(i) for i in items))`` without joining (items are bounded values)."""
    pieces = [value_size(i) for i in items]
    return sum(pieces) + len(separator) * max(len(pieces) - 1, 0)


@dataclass
class Budget:
    """What one recipe file may spend on templates: operations, renders and seconds (a CPU backstop:
    the sandbox already refuses loops and oversized values, so these are reached only by many values)."""

    operations: int = MAX_OPERATIONS
    renders: int = MAX_RENDERS
    seconds: float = MAX_SECONDS
    started: float = field(default_factory=time.monotonic)

    def tick(self) -> None:
        """One sandboxed operation; refused past the operation or time budget."""
        self.operations -= 1
        if self.operations < 0:
            raise TemplateLimit(f"templates ran more than {MAX_OPERATIONS} operations (limit per recipe)")
        if self.operations % 256 == 0:
            self.check_time()

    def render(self) -> None:
        """One template render; refused past the render or time budget."""
        self.renders -= 1
        if self.renders < 0:
            raise TemplateLimit(f"more than {MAX_RENDERS} templated values to render (limit per recipe)")
        self.check_time()

    def check_time(self) -> None:
        if time.monotonic() - self.started > self.seconds:
            raise TemplateLimit(f"templates took longer than {self.seconds:g} s (limit per recipe)")
