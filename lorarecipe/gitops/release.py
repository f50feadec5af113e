"""Publish the outputs of recipe builds: recipes -> the Hub commits of their ``publish`` outputs.

Recipe files (as ``build`` takes them) -> one ``PublishOutcome`` per build that publishes something.
The publish settings come from the recipe as it is now (they are not part of any build key), the
files from the build folder ``build`` wrote (same ``--out`` rules). A build folder is published only
when its manifest says the build finished and lists each output as built from the recipe's current
plan (the key of its part of the plan matches): a stale or partial folder is refused with "build it
first", and the files are re-hashed against the manifest before anything is sent
(:mod:`lorarecipe.publish`).
Library code: returns outcomes; the CLI prints them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IntegrityError, LorarecipeError, Problem, UsageError
from ..fs.json_files import read_json
from ..outputs.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES
from ..plan import Plan
from .batch import BatchOptions, out_root_for

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from ..publish import PublishResult

__all__ = ["PublishOutcome", "publish_recipes"]


@dataclass
class PublishOutcome:
    recipe: str
    build: str
    out: str
    ok: bool
    results: list[PublishResult] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "build": self.build,
            "out": self.out,
            "ok": self.ok,
            "published": [r.to_json() for r in self.results],
            "problems": [p.to_json() for p in self.problems],
        }


def _check_built_from(plan: Plan, out: Path) -> None:
    """Refuse a build folder whose manifest is missing, unfinished, or lists a published output as
    built from another state of the recipe."""
    path = out / MANIFEST_NAME
    hint = "run `lorarecipe build` first; publish never sends a partial or stale build"
    try:
        doc = (
            read_json(path, expect=None, max_bytes=MAX_MANIFEST_BYTES)
            if path.is_file() and not path.is_symlink()
            else None
        )
    except (OSError, ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), dict):
        raise IntegrityError(
            f"{out}: no readable {MANIFEST_NAME}", [Problem(f"{out}: no readable {MANIFEST_NAME}", hint=hint)]
        )
    if doc.get("build_complete") is False:
        message = f"{out}: the last build into this folder did not finish"
        raise IntegrityError(message, [Problem(message, hint=hint)])
    problems = []
    for target in plan.publish:
        entry = doc["outputs"].get(target.output)
        if not isinstance(entry, dict) or entry.get("plan_part") != plan.part_key(
            plan.output_step(target.output).id
        ):
            state = (
                "is not built"
                if not isinstance(entry, dict)
                else "was built from another state of the recipe"
            )
            problems.append(Problem(f"{out}: outputs.{target.output} {state}", hint=hint))
    if problems:
        raise IntegrityError(problems[0].message, problems)


def _publish_plan(plan: Plan, out: Path, dry_run: bool, api: HfApi | None) -> list[PublishResult]:
    from ..publish import PublishSpec, publish_build

    _check_built_from(plan, out)
    specs = {
        t.output: PublishSpec(
            repo=t.repo,
            private=t.private,
            revision=t.revision,
            create=t.create,
            commit_message=t.commit_message,
        )
        for t in plan.publish
    }
    return publish_build(out, specs, dry_run=dry_run, api=api)


def publish_recipes(
    files: Sequence[Path],
    options: BatchOptions,
    several: bool,
    *,
    dry_run: bool = False,
    api: HfApi | None = None,
) -> list[PublishOutcome]:
    """Publish every build (of every recipe file) that has outputs with a ``publish`` section."""
    from ..compiler import compile_recipe
    from ..recipe.load import load_recipe

    outcomes: list[PublishOutcome] = []
    for path in files:
        try:
            loaded = load_recipe(path, dict(options.overrides))
            plans = [compile_recipe(loaded, build, allow_read=options.allow_read) for build in loaded.builds]
        except UsageError:
            raise
        except LorarecipeError as exc:
            outcomes.append(PublishOutcome(str(path), "", "", False, problems=exc.problems))
            continue
        root = Path(os.path.abspath(out_root_for(options, loaded.name, several)))
        for plan in plans:
            if not plan.publish:
                continue
            out = root / plan.build if plan.build else root
            outcome = PublishOutcome(loaded.display, plan.build, str(out), False)
            try:
                outcome.results = _publish_plan(plan, out, dry_run, api)
                outcome.ok = True
            except UsageError:
                raise
            except LorarecipeError as exc:
                outcome.problems = exc.problems
            outcomes.append(outcome)
    return outcomes
