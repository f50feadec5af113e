"""Checks of each output's ``publish`` section: where ``lorarecipe publish`` puts it on the Hub.

Recipe outputs -> :class:`~lorarecipe.plan.PublishTarget` per published output, rendered and
validated like hub inputs (repo id, branch), with located problems. ``repo`` and ``commit_message``
are templates over the recipe's variables plus ``name`` (the recipe's name), ``build`` (the matrix
label) and ``output`` (the output's name); a recipe variable of the same name wins. Two outputs of
one build may not publish to the same repo and branch. Torch-free: never imports huggingface_hub.
"""

from __future__ import annotations

from typing import Any

from ..plan import PublishTarget
from .context import CompileContext

__all__ = ["check_publish"]


def _render(ctx: CompileContext, path: tuple[Any, ...], value: str, context: dict[str, Any]) -> str | None:
    if not any(marker in value for marker in ("{{", "{%", "{#")):
        return value
    from ..recipe.templating import TemplateProblem, render_scalar

    try:
        return str(render_scalar(value, context))
    except TemplateProblem as exc:
        ctx.error(path, str(exc))
        return None


def check_publish(ctx: CompileContext, recipe_name: str) -> tuple[PublishTarget, ...]:
    """The publish targets of the build's outputs (problems are added to ``ctx``)."""
    from ..publish import repo_id_problem, revision_problem

    targets: list[PublishTarget] = []
    seen: dict[tuple[str, str], str] = {}
    for name, spec in ctx.recipe.outputs.items():
        publish = getattr(spec, "publish", None)
        if publish is None:
            continue
        where = ("outputs", name, "publish")
        context = {"name": recipe_name, "build": ctx.build.label, "output": name, **dict(ctx.build.variables)}
        repo = _render(ctx, (*where, "repo"), publish.repo, context)
        message = publish.commit_message
        if message is not None:
            message = _render(ctx, (*where, "commit_message"), message, context)
        if repo is None:
            continue
        problem = repo_id_problem(repo)
        if problem is not None:
            ctx.error((*where, "repo"), problem, "a Hub model repo id such as 'myorg/my-merge'")
            continue
        problem = revision_problem(publish.revision)
        if problem is not None:
            ctx.error((*where, "revision"), problem)
            continue
        key = (repo.lower(), publish.revision)
        if key in seen:
            ctx.error(
                (*where, "repo"),
                f"outputs.{seen[key]} already publishes to {repo} @ {publish.revision}",
                "give each output its own repo (e.g. with {{ output }} in the name) or branch",
            )
            continue
        seen[key] = name
        targets.append(PublishTarget(name, repo, publish.revision, publish.private, publish.create, message))
    return tuple(targets)
