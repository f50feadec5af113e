"""Turn any failure inside a plan step into a ``StepFailedError`` located at the recipe line.

``with step_context(step): ...`` — an out-of-memory during ``fuse`` is then reported as
``recipes/x.yaml:31:1: error: fuse: step fuse failed: …`` instead of a traceback (httpx's
``request_context`` pattern). lorarecipe's own errors pass through with the location added.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import LorarecipeError, Problem, SourceSpan, StepFailedError
from ..plan import Step

__all__ = ["step_context"]


def step_span(step: Step) -> SourceSpan | None:
    if step.origin is None:
        return None
    return SourceSpan(step.origin.file, step.origin.line, step.origin.col)


@contextlib.contextmanager
def step_context(step: Step) -> Iterator[None]:
    """Re-raise failures of ``step`` as located lorarecipe errors."""
    try:
        yield
    except StepFailedError:
        raise
    except LorarecipeError as exc:
        span = step_span(step)
        path = step.origin.path if step.origin else ""
        exc.problems = [
            Problem(p.message, p.path or path, p.span or span, p.hint, p.severity) for p in exc.problems
        ]
        raise
    except MemoryError:
        raise StepFailedError(
            step.id,
            "out of memory",
            step_span(step),
            step.origin.path if step.origin else "",
            "try --executor streaming, a smaller dtype, or a machine with more RAM",
        ) from None
    except Exception as exc:
        cause = f"{type(exc).__name__}: {exc}".strip()
        if "out of memory" in cause.lower():
            hint = "the device ran out of memory; try --device cpu or --executor streaming"
        else:
            hint = None
        raise StepFailedError(
            step.id, cause[:2000], step_span(step), step.origin.path if step.origin else "", hint
        ) from exc
