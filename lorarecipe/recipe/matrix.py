"""Matrix axes -> builds: each combination of values and the folder label it builds into.

A label is ``key-value`` pairs joined by ``_`` when every value reads back exactly as written
(``s-0.5``, ``style-ink``); otherwise (characters a folder name cannot hold, a long value, a string
that would read back as a number, ``"1"`` beside ``1``) a readable prefix and ``=`` + 12 hex digits of
the sha256 of the exact typed values. Distinct combinations therefore get distinct folders by
construction: plain labels decode to their values, hashed ones contain ``=`` (plain ones never do).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

from ..errors import Problem
from .yaml_source import PositionMap, resolve_plain_scalar

__all__ = ["build_label", "combinations", "duplicate_values"]

_PLAIN_TOKEN = re.compile(r"^[A-Za-z0-9.-]{1,40}$")
_PLAIN_LABEL = re.compile(r"^[A-Za-z0-9._-]{1,120}$")
_PREFIX_CHARS = 100


def _plain(value: Any) -> bool:
    """``str(value)`` is a folder-safe token that reads back as exactly ``value`` (same type)."""
    token = str(value)
    if not _PLAIN_TOKEN.match(token):
        return False
    back = resolve_plain_scalar(token)
    return type(back) is type(value) and back == value


def _identity(value: Any) -> list[Any]:
    return [type(value).__name__, value]


def build_label(combo: dict[str, Any]) -> str:
    """One combination -> its folder name ('' without a matrix); distinct combinations, distinct names."""
    if not combo:
        return ""
    plain = "_".join(f"{k}-{v}" for k, v in combo.items())
    if all(_plain(v) for v in combo.values()) and _PLAIN_LABEL.match(plain):
        return plain
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", plain)[:_PREFIX_CHARS]
    exact = json.dumps([[k, *_identity(v)] for k, v in combo.items()], ensure_ascii=True)
    return f"{readable}={hashlib.sha256(exact.encode()).hexdigest()[:12]}"


def duplicate_values(axes: dict[str, list[Any]], positions: PositionMap) -> list[Problem]:
    """A value listed twice on one axis would build the same combination twice into one folder."""
    problems = []
    for name, values in axes.items():
        seen: set[str] = set()
        for index, value in enumerate(values):
            key = json.dumps(_identity(value))
            if key in seen:
                problems.append(
                    Problem(
                        f"matrix axis {name!r} lists {value!r} twice",
                        f"matrix.{name}[{index}]",
                        positions.value(("matrix", name, index)),
                        "remove the repeated value",
                    )
                )
            seen.add(key)
    return problems


def combinations(axes: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    """Every combination of the axes' values, in order ({} once without a matrix)."""
    for values in itertools.product(*axes.values()) if axes else [()]:
        yield dict(zip(axes, values, strict=True))
