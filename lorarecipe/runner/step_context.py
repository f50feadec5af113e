"""Turn a failure inside a plan step into a located error: the user's to act on, or a bug.

``with step_context(step): ...`` — an out-of-memory during ``fuse`` is then reported as
``recipes/x.yaml:31:1: error: fuse: step fuse failed: …`` instead of a traceback (httpx's
``request_context`` pattern). lorarecipe's own errors pass through with the location added. What a
user can act on (``OSError``: disk full, permission, a missing file; ``MemoryError`` or a device
out-of-memory) becomes ``StepFailedError`` (exit 1); any other exception is a bug in lorarecipe or
in how it drives a library, and becomes ``InternalError`` (exit 3, "please report it"), still
naming the step and its recipe line.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator

from ..errors import InternalError, LorarecipeError, Problem, SourceSpan, StepFailedError
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
    except OSError as exc:
        raise StepFailedError(
            step.id,
            f"{type(exc).__name__}: {exc}".strip()[:2000],
            step_span(step),
            step.origin.path if step.origin else "",
            "check the disk space, the permissions and the paths named above",
        ) from exc
    except Exception as exc:
        cause = f"{type(exc).__name__}: {exc}".strip()
        if is_device_out_of_memory(exc):
            raise StepFailedError(
                step.id,
                cause[:2000],
                step_span(step),
                step.origin.path if step.origin else "",
                "the device ran out of memory; try --device cpu or --executor streaming",
            ) from exc
        raise InternalError(
            step.id,
            cause[:2000],
            step_span(step),
            step.origin.path if step.origin else "",
            "".join(traceback.format_exception(exc)),
        ) from exc


def is_device_out_of_memory(exc: BaseException) -> bool:
    """torch's ``OutOfMemoryError`` (CUDA, a ``RuntimeError``) or an MPS/CPU allocator "out of memory"."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()
