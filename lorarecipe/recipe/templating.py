"""``{{ variable }}`` in recipe strings, rendered in a locked-down jinja2 sandbox.

String scalar + variables -> value. Recipes are untrusted, so the environment has no globals
(no ``range``, ``cycler``, ``lipsum``…), only a few pure filters, refuses ``_``-prefixed attributes
(jinja2's sandbox raises ``SecurityError``), caps string/number growth from ``*``/``**`` and the
size of the output, and undefined names are errors. The result is re-read as a YAML 1.2 scalar so
``"{{ w }}"`` with ``w: 0.7`` gives the float 0.7.
"""

from __future__ import annotations

from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .yaml_source import resolve_plain_scalar

__all__ = ["MAX_RENDERED_CHARS", "TemplateProblem", "render_scalar"]

MAX_RENDERED_CHARS = 10_000
_MAX_POWER_EXPONENT = 64
_MAX_INT_BITS = 4096
_SAFE_FILTERS = (
    "abs",
    "capitalize",
    "default",
    "float",
    "format",
    "int",
    "join",
    "length",
    "lower",
    "replace",
    "round",
    "string",
    "title",
    "trim",
    "upper",
)


class TemplateProblem(Exception):
    """A template could not be rendered; the message is meant for the user."""


class _LockedSandbox(ImmutableSandboxedEnvironment):
    """Sandbox that also bounds the size of what ``*`` and ``**`` can produce."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, (int, float)) and abs(right) > _MAX_POWER_EXPONENT:
                raise SecurityError(f"exponent {right} is too large (limit {_MAX_POWER_EXPONENT})")
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and right * abs(left).bit_length() > _MAX_INT_BITS
            ):
                raise SecurityError(f"the result of {operator} would exceed {_MAX_INT_BITS} bits")
            return left**right
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                big = isinstance(seq, (str, list, tuple)) and isinstance(count, int)
                if big and len(seq) * max(count, 0) > MAX_RENDERED_CHARS:
                    raise SecurityError(f"repetition would exceed {MAX_RENDERED_CHARS} items")
            return left * right
        return super().call_binop(context, operator, left, right)  # pragma: no cover


def _make_env() -> _LockedSandbox:
    env = _LockedSandbox(undefined=StrictUndefined, autoescape=False, cache_size=0)
    env.globals.clear()
    env.filters = {name: env.filters[name] for name in _SAFE_FILTERS}
    env.tests = {name: env.tests[name] for name in ("defined", "undefined", "number", "string")}
    return env


_ENV = _make_env()


def render_scalar(text: str, variables: dict[str, Any]) -> object:
    """Render one string scalar; re-resolve the result as a YAML scalar (numbers stay numbers)."""
    try:
        rendered = _ENV.from_string(text).render(**variables)
    except SecurityError as exc:
        raise TemplateProblem(f"template refused by the sandbox: {exc}") from None
    except TemplateError as exc:
        raise TemplateProblem(f"template error: {exc.message or exc}") from None
    except (ArithmeticError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        raise TemplateProblem(f"template error: {exc}") from None
    if len(rendered) > MAX_RENDERED_CHARS:
        raise TemplateProblem(f"template output is longer than {MAX_RENDERED_CHARS} characters")
    if not rendered or rendered.strip() != rendered:
        return rendered
    return resolve_plain_scalar(rendered)
