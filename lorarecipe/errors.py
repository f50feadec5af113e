"""The one exception tree of lorarecipe.

Library code raises these; only ``cli.py`` prints them and picks an exit code::

    LorarecipeError                      every error lorarecipe raises on purpose
    ├── RecipeError                      the user's input is wrong        -> exit 1
    │   ├── RecipeSyntaxError            not YAML, duplicate keys, limits exceeded
    │   ├── RecipeValidationError        YAML fine, schema violated (pydantic)
    │   └── RecipeCompileError           schema fine, references/files/ranks/paths wrong
    ├── UsageError                       bad command line (unknown --set name, ...) -> exit 2
    └── BuildError                       something failed while building     -> exit 1
        ├── InputUnavailableError        model/file not present (offline, not cached)
        ├── UnsafeInputError             pickle, path escape, NaN/Inf, oversized header
        ├── IntegrityError               a hash does not match the lock/manifest
        ├── LockError                    lock missing or stale with --frozen; output root busy
        ├── StepFailedError              a plan step failed; carries the step and recipe location
        ├── InternalError                a bug surfaced inside a plan step (located)    -> exit 3
        └── ExecutorRefusal              an executor cannot build an output; the next one may
            └── StreamingUnsupported     the streaming fuser cannot reproduce this exactly

Every error carries a list of :class:`Problem` so that *all* problems in a file are reported at
once, each with a location (``file:line:col``), the recipe path (``merges.style-mix.method``) and
a hint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "MAX_PROBLEMS",
    "BuildError",
    "ExecutorRefusal",
    "InputUnavailableError",
    "IntegrityError",
    "InternalError",
    "LockError",
    "LorarecipeError",
    "Problem",
    "RecipeCompileError",
    "RecipeError",
    "RecipeSyntaxError",
    "RecipeValidationError",
    "SourceSpan",
    "StepFailedError",
    "StreamingUnsupported",
    "UnsafeInputError",
    "UsageError",
]


@dataclass(frozen=True)
class SourceSpan:
    """A 1-based position range in a text file (end column is exclusive)."""

    file: str
    line: int
    col: int
    end_line: int | None = None
    end_col: int | None = None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input, located as precisely as we can."""

    message: str
    path: str = ""
    span: SourceSpan | None = None
    hint: str | None = None
    severity: str = "error"

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"severity": self.severity, "message": self.message, "path": self.path}
        if self.span is not None:
            doc.update(file=self.span.file, line=self.span.line, col=self.span.col)
            if self.span.end_col is not None:
                doc.update(end_line=self.span.end_line, end_col=self.span.end_col)
        if self.hint:
            doc["hint"] = self.hint
        return doc


#: An error reports at most this many problems (a hostile file can produce thousands of the same one).
MAX_PROBLEMS = 100


def _capped(problems: list[Problem]) -> list[Problem]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    more = len(problems) - MAX_PROBLEMS
    return [*problems[:MAX_PROBLEMS], Problem(f"... and {more} more problems (limit: {MAX_PROBLEMS} shown)")]


class LorarecipeError(Exception):
    """Base class: every error lorarecipe raises on purpose."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems: list[Problem] = _capped(list(problems)) if problems else [Problem(message)]


class RecipeError(LorarecipeError):
    """The recipe (or something it names) is wrong; the user must edit it."""


class RecipeSyntaxError(RecipeError):
    """The file is not a YAML document we accept."""


class RecipeValidationError(RecipeError):
    """The YAML does not match the recipe schema."""


class RecipeCompileError(RecipeError):
    """The recipe is well-formed but cannot be compiled into a plan."""


class UsageError(LorarecipeError):
    """The command line is wrong (exit code 2)."""


class BuildError(LorarecipeError):
    """Building failed."""


class InputUnavailableError(BuildError):
    """A model or file the recipe needs is not available (e.g. offline and not cached)."""


class UnsafeInputError(BuildError):
    """An input is refused for safety: pickle, path escape, NaN/Inf, absurd header."""


class IntegrityError(BuildError):
    """A file's content hash does not match what the lock or manifest promises."""


class LockError(BuildError):
    """Lock file missing/stale under --frozen, or the output root is locked by another build."""


@dataclass
class StepFailedError(BuildError):
    """A plan step failed. Carries the step id and the recipe location it came from."""

    step_id: str
    cause: str
    span: SourceSpan | None = None
    path: str = ""
    hint: str | None = None
    problems: list[Problem] = field(init=False)

    def __post_init__(self) -> None:
        message = f"step {self.step_id} failed: {self.cause}"
        LorarecipeError.__init__(
            self, message, [Problem(message, path=self.path, span=self.span, hint=self.hint)]
        )

    def __str__(self) -> str:
        return self.message


@dataclass
class InternalError(BuildError):
    """An unexpected exception inside a plan step: not something the user can fix in the recipe or on
    the machine, but a bug in lorarecipe (or in a library it drives). Still located at the step and
    its recipe line, so the report says where; the CLI exits 3 and asks for a report."""

    step_id: str
    cause: str
    span: SourceSpan | None = None
    path: str = ""
    traceback: str = ""  # the original exception's traceback, for the bug report
    problems: list[Problem] = field(init=False)

    def __post_init__(self) -> None:
        message = f"internal error in step {self.step_id}: {self.cause}"
        hint = "this is a bug in lorarecipe, please report it (with the recipe and the output of --version)"
        LorarecipeError.__init__(self, message, [Problem(message, path=self.path, span=self.span, hint=hint)])

    def __str__(self) -> str:
        return self.message


class ExecutorRefusal(BuildError):
    """An executor cannot build an output (not an error in the input): the runner hands the output to
    the next executor. Raised only at the real refusal points; every other error fails the build."""


class StreamingUnsupported(ExecutorRefusal):
    """The streaming fuser cannot reproduce the diffusers route exactly for this output (a LoRA bias,
    a non-Linear/Conv2d layer, a single file in an unknown layout, …)."""
