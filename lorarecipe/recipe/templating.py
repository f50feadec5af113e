"""``{{ variable }}`` in recipe strings, rendered in a locked-down jinja2 sandbox.

String scalar + variables -> value. Recipes are untrusted, so the sandbox allows expressions and
``{% if %}`` only (no loops, assignments, macros, includes: the work of a template is linear in its
size), no globals, a few pure filters, a short list of attributes of plain values, and refuses
``_``-prefixed attributes. Every operation that could build a large value (``*``, ``**``, ``%``,
``~``, ``format``, ``replace``, ``join``, padding, output) is checked against ``template_limits``
before it runs; a :class:`~lorarecipe.recipe.template_limits.Budget` bounds the operations, renders
and seconds of a whole recipe file. Undefined names are errors. The result is re-read as a YAML 1.2
scalar so ``"{{ w }}"`` with ``w: 0.7`` gives the float 0.7.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.environment import Template
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter

from .template_limits import (
    MAX_INT_BITS,
    MAX_POWER_EXPONENT,
    MAX_VALUE_CHARS,
    Budget,
    TemplateLimit,
    format_spec_width,
    join_length,
    percent_length,
    replace_length,
    require_size,
    value_size,
)
from .yaml_source import resolve_plain_scalar

__all__ = ["MAX_RENDERED_CHARS", "MAX_TEMPLATE_NODES", "Budget", "TemplateProblem", "render_scalar"]

MAX_RENDERED_CHARS = MAX_VALUE_CHARS
MAX_TEMPLATE_NODES = 256

#: Template syntax a recipe may use: expressions and ``{% if %}``; anything that loops, assigns,
#: defines or loads templates is refused before compiling.
_ALLOWED_NODES = (
    nodes.Template,
    nodes.Output,
    nodes.TemplateData,
    nodes.If,
    nodes.Name,
    nodes.Const,
    nodes.Tuple,
    nodes.List,
    nodes.Dict,
    nodes.Pair,
    nodes.Keyword,
    nodes.CondExpr,
    nodes.Filter,
    nodes.Test,
    nodes.Call,
    nodes.Getitem,
    nodes.Getattr,
    nodes.Slice,
    nodes.Concat,
    nodes.Compare,
    nodes.Operand,
    nodes.BinExpr,
    nodes.UnaryExpr,
)
#: Attributes of plain values a template may read (and call): nothing that mutates or converts to bytes.
# fmt: off
_STR_METHODS = frozenset((
    "capitalize", "casefold", "center", "count", "endswith", "expandtabs", "find", "format", "format_map",
    "index", "isalnum", "isalpha", "isascii", "isdecimal", "isdigit", "isidentifier", "islower",
    "isnumeric", "isprintable", "isspace", "istitle", "isupper", "join", "ljust", "lower", "lstrip",
    "partition", "removeprefix", "removesuffix", "replace", "rfind", "rindex", "rjust", "rpartition",
    "rsplit", "rstrip", "split", "splitlines", "startswith", "strip", "swapcase", "title", "upper", "zfill",
))
# fmt: on
_ATTRIBUTES: tuple[tuple[type, frozenset[str]], ...] = (
    (str, _STR_METHODS),
    (list, frozenset({"count", "index"})),
    (tuple, frozenset({"count", "index"})),
    (dict, frozenset({"get", "items", "keys", "values"})),
    (bool, frozenset()),
    (int, frozenset({"bit_length"})),
    (float, frozenset({"is_integer"})),
)
# fmt: off
_SAFE_FILTERS = (
    "abs", "capitalize", "default", "float", "format", "int", "join", "length", "lower", "replace", "round",
    "string", "title", "trim", "upper",
)
# fmt: on
_SAFE_TESTS = ("defined", "undefined", "number", "string")
_BUDGET: ContextVar[Budget | None] = ContextVar("lorarecipe_template_budget", default=None)


class TemplateProblem(Exception):
    """A template could not be rendered; the message is meant for the user."""


def _tick() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.tick()


def _attribute_allowed(obj: Any, attr: str) -> bool:
    return any(type(obj) is kind and attr in names for kind, names in _ATTRIBUTES)


def _check_padding(method: str, obj: str, args: tuple[Any, ...]) -> None:
    """Before a str method that can grow its string runs: the length it would produce."""
    what = f"str.{method}()"
    if method in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        if args[0] > MAX_VALUE_CHARS:
            raise TemplateLimit(f"{what} would pad to {args[0]} characters (limit: {MAX_VALUE_CHARS})")
    elif method == "expandtabs":
        size = len(obj) + obj.count("\t") * max(int(args[0]) if args else 8, 0)
        if size > MAX_VALUE_CHARS:
            raise TemplateLimit(f"{what} would be {size} characters long (limit: {MAX_VALUE_CHARS})")
    elif method == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _require_length(what, replace_length(obj, args[0], args[1], *args[2:3]))
    elif method == "join" and args:
        _require_length(what, join_length(obj, list(args[0])))


def _require_length(what: str, size: int) -> None:
    if size > MAX_VALUE_CHARS:
        raise TemplateLimit(
            f"{what} would be {size} characters long (limit: {MAX_VALUE_CHARS} characters per value)"
        )


class _BoundedFormatter(SandboxedFormatter):
    """``str.format`` whose fields are checked: no width over the limit, no result over the limit."""

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self._written = 0  # the fields' text; the whole result is checked again by ``call``
        return super().vformat(format_string, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> Any:
        _tick()
        format_spec_width(format_spec)
        require_size(value, "a str.format() argument")
        text = super().format_field(value, format_spec)
        self._written += len(text)
        _require_length("the str.format() result", self._written)
        return text


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` to the environment's bounded join instead of a plain one."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _LockedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with every operator, call, attribute and output checked for size and budget."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    intercepted_unops = frozenset({"+", "-"})
    code_generator_class = _BoundedCodeGenerator

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return super().is_safe_attribute(obj, attr, value) and _attribute_allowed(obj, attr)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        what = f"the result of {operator!r}"
        if operator == "**":
            _check_power(left, right)
        elif operator == "*":
            _check_product(left, right)
        elif operator == "%" and isinstance(left, str):
            percent_length(left, right)
        elif operator == "+" and isinstance(left, (str, list, tuple)):
            _require_length(what, value_size(left) + value_size(right))
        return require_size(self.binop_table[operator](left, right), what)

    def call_unop(self, context: Any, operator: str, arg: Any) -> Any:
        _tick()
        return self.unop_table[operator](arg)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        method = getattr(__obj, "__name__", "?")
        owner = getattr(__obj, "__self__", None)
        formatting = getattr(__obj, "lorarecipe_bounded", False)
        builtin = isinstance(__obj, types.BuiltinMethodType) and _attribute_allowed(owner, method)
        if not (formatting or builtin):
            raise SecurityError(f"calling {method!r} is not allowed in a recipe template")
        for value in (*args, *kwargs.values()):
            require_size(value, f"an argument of {method}()")
        if isinstance(owner, str):
            _check_padding(method, owner, args)
        return require_size(__obj(*args, **kwargs), f"the result of {method}()")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``str.format``/``format_map`` through :class:`_BoundedFormatter` (jinja2's own wrapper uses
        an unbounded one)."""
        if not isinstance(value, types.BuiltinMethodType) or value.__name__ not in ("format", "format_map"):
            return None
        text = value.__self__
        if type(text) is not str:
            return None
        formatter = _BoundedFormatter(self)
        is_map = value.__name__ == "format_map"

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                return str(formatter.vformat(text, (), args[0]))
            return str(formatter.vformat(text, args, kwargs))

        bounded_format.lorarecipe_bounded = True  # type: ignore[attr-defined]
        bounded_format.__name__ = value.__name__
        return bounded_format

    def bounded_concat(self, parts: tuple[Any, ...]) -> str:
        """``a ~ b ~ …``: each part and the joined length within the limit."""
        _tick()
        _require_length("the result of '~'", sum(value_size(p) for p in parts))
        joined = "".join(map(str, parts))
        require_size(joined, "the result of '~'")
        return joined


def _check_power(left: Any, right: Any) -> None:
    if isinstance(right, (int, float)) and abs(right) > MAX_POWER_EXPONENT:
        raise TemplateLimit(f"exponent {right} is too large (limit: {MAX_POWER_EXPONENT})")
    if isinstance(left, int) and isinstance(right, int) and right * abs(left).bit_length() > MAX_INT_BITS:
        raise TemplateLimit(f"the result of '**' would exceed {MAX_INT_BITS} bits (limit)")


def _check_product(left: Any, right: Any) -> None:
    for seq, count in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
            _require_length("the result of '*'", value_size(seq) * max(count, 0))
    if isinstance(left, int) and isinstance(right, int):
        bits = left.bit_length() + right.bit_length()
        if bits > MAX_INT_BITS + 1:
            raise TemplateLimit(f"the result of '*' would exceed {MAX_INT_BITS} bits (limit)")


def _finalize(value: Any) -> str:
    """Each ``{{ … }}`` output: bounded before and after ``str()``."""
    _tick()
    return str(require_size(str(require_size(value, "an output value")), "an output value"))


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A jinja2 filter with its arguments and result checked, and the amplifying ones pre-checked."""

    @functools.wraps(function)  # keeps jinja2's pass_eval_context marker
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        values = [a for a in (*args, *kwargs.values()) if not hasattr(a, "environment")]
        for value in values:
            require_size(value, f"an argument of the {name!r} filter")
        if name == "format" and values:
            percent_length(str(values[0]), kwargs or tuple(values[1:]))
        elif name == "replace" and len(values) >= 3:
            text, old, new = map(str, values[:3])
            count = values[3] if len(values) > 3 else None
            _require_length("the 'replace' filter's result", replace_length(text, old, new, count))
        elif name == "join" and values:
            separator = str(values[1]) if len(values) > 1 else str(kwargs.get("d", ""))
            _require_length("the 'join' filter's result", join_length(separator, list(values[0])))
        return require_size(function(*args, **kwargs), f"the result of the {name!r} filter")

    return bounded


def _make_env() -> _LockedSandbox:
    env = _LockedSandbox(
        undefined=StrictUndefined, autoescape=False, cache_size=0, optimized=False, finalize=_finalize
    )
    env.globals.clear()
    env.filters = {name: _bounded_filter(name, env.filters[name]) for name in _SAFE_FILTERS}
    env.tests = {name: env.tests[name] for name in _SAFE_TESTS}
    return env


_ENV = _make_env()


def _check_syntax(tree: nodes.Template) -> None:
    """Refuse statements other than ``if`` and templates over :data:`MAX_TEMPLATE_NODES` nodes."""
    for count, node in enumerate(tree.find_all(nodes.Node), 1):
        if count > MAX_TEMPLATE_NODES:
            raise TemplateLimit(f"the template has more than {MAX_TEMPLATE_NODES} parts (limit)")
        if not isinstance(node, _ALLOWED_NODES):
            kind = type(node).__name__.lower()
            raise SecurityError(f"'{kind}' is not allowed in a recipe template (only expressions and if)")


@functools.lru_cache(maxsize=512)
def _compile(text: str) -> Template:
    if len(text) > MAX_RENDERED_CHARS:
        raise TemplateLimit(f"a templated value is longer than {MAX_RENDERED_CHARS} characters (limit)")
    tree = _ENV.parse(text)
    _check_syntax(tree)
    return _ENV.from_string(tree)


def _render(text: str, variables: Mapping[str, Any]) -> str:
    out: list[str] = []
    written = 0
    for piece in _compile(text).generate(**variables):
        written += len(piece)
        _require_length("the rendered template", written)
        out.append(piece)
    return "".join(out)


def render_scalar(text: str, variables: dict[str, Any], budget: Budget | None = None) -> object:
    """Render one string scalar; re-resolve the result as a YAML scalar (numbers stay numbers).

    ``budget`` is shared by every render of one recipe file (a fresh one when not given)."""
    budget = budget or Budget()
    token = _BUDGET.set(budget)
    try:
        budget.render()
        rendered = _render(text, variables)
    except TemplateLimit as exc:
        raise TemplateProblem(f"template refused: {exc}") from None
    except SecurityError as exc:
        raise TemplateProblem(f"template refused by the sandbox: {exc}") from None
    except TemplateError as exc:
        raise TemplateProblem(f"template error: {exc.message or exc}") from None
    except RecursionError:
        raise TemplateProblem("template refused: its expressions nest too deeply to parse") from None
    except (ArithmeticError, ValueError, TypeError, LookupError, MemoryError) as exc:
        raise TemplateProblem(f"template error: {exc}") from None
    finally:
        _BUDGET.reset(token)
    if not rendered or rendered.strip() != rendered:
        return rendered
    return resolve_plain_scalar(rendered)
