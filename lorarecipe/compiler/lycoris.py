"""Static checks of LyCORIS/DoRA adapters — the files lorarecipe applies itself — from headers only.

An adapter's ``LoraInfo.lycoris`` + the base's weight keys -> located problems and the check that
``lorarecipe plan`` shows. Problems: keys no adapter rule applies to (they would be dropped), modules
that find no base weight or do not fit the one they name (``inspect.adapter_targets``, the same
placement both executors use), modules that fit but hold what lorarecipe does not apply (bias deltas,
non-float factors, DoRA magnitudes whose axis the shapes cannot decide), a ``peft`` scale
convention on a full-matrix LoKr without a rank. The check: algorithms, factor ranks, the largest
rank ΔW can have, the scale convention, DoRA axes, the base weights changed per component and, on a
block-grouped DiT, which blocks; its facts (``plan --json``) list every module with its factor shapes
and the weights it changes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..families import get_family
from ..families.original_names import blocks_touched
from ..inspect import BaseInfo
from ..inspect.adapter_targets import ModelKeys, PlacementReport, place_adapter
from ..inspect.lycoris_keys import LycorisInfo
from ..plan import Check
from .context import CompileContext

__all__ = ["algorithm_names", "base_keys", "check_lycoris_adapter", "lycoris_convention"]

_LISTED = 5
_ORDER = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
#: each algorithm as users know it (LyCORIS's names)
_LABELS = {
    "lora": "LoRA/LoCon",
    "locon-tucker": "LoCon (Tucker)",
    "loha": "LoHa",
    "loha-tucker": "LoHa (Tucker)",
    "lokr-full": "LoKr (full)",
    "lokr-decomposed": "LoKr (decomposed)",
    "lokr-tucker": "LoKr (Tucker)",
}


def algorithm_names(info: LycorisInfo) -> str:
    """'LoKr (decomposed) ×350, LoHa ×2' (with ' + DoRA' when a module has a magnitude)."""
    text = ", ".join(f"{_LABELS.get(a, a)} ×{n}" for a, n in info.algorithms)
    return text + (" + DoRA" if any(m.dora for m in info.modules) else "")


def base_keys(info: BaseInfo) -> ModelKeys:
    """A base's header keys and shapes per component, for placing adapter modules."""
    return ModelKeys(
        {c: {k: shape for k, (_, shape) in comp.tensors.items()} for c, comp in info.components.items()}
    )


def lycoris_convention(info: LycorisInfo, declared: str | None) -> str:
    """The LoKr scale convention an adapter is applied with: the recipe's, else the file's own."""
    return declared or (info.convention if info.convention in ("lycoris", "peft") else "lycoris")


def _listing(items: list[str], total: int) -> str:
    shown = "; ".join(items[:_LISTED])
    return shown + (f"; and {total - _LISTED} more" if total > _LISTED else "")


def _unclassified(ctx: CompileContext, where: tuple[Any, ...], info: LycorisInfo) -> bool:
    if not info.unclassified:
        return True
    items = [f"{u.key} ({u.reason})" for u in info.unclassified]
    ctx.error(
        where,
        f"{len(items)} tensors of the file are no adapter factor, alpha or DoRA magnitude lorarecipe can "
        f"apply, and would be dropped: {_listing(items, len(items))}",
        on_key=True,
    )
    return False


def _convention(ctx: CompileContext, where: tuple[Any, ...], info: LycorisInfo, convention: str) -> None:
    """A 'peft' LoKr of full factors scales by α/r with the config's r, which the tensors do not hold."""
    if convention != "peft":
        return
    rankless = [m.stem for m in info.modules if m.algorithm == "lokr-full" and m.rank is None]
    if rankless:
        ctx.error(
            (*where, "scale_convention"),
            f"scale_convention 'peft' scales LoKr by alpha/r, but {len(rankless)} full-matrix LoKr modules "
            f"store no rank r (e.g. {rankless[0]})",
            "use scale_convention: lycoris (scale 1), or a file saved with its PEFT adapter metadata",
        )


def _summary(
    info: LycorisInfo, report: PlacementReport | None, convention: str, family_key: str | None
) -> str:
    algorithms = ", ".join(f"{_LABELS.get(a, a)} ×{n}" for a, n in info.algorithms)
    ranks = sorted({m.rank for m in info.modules if m.rank is not None})
    rank_text = f", factor rank {'/'.join(map(str, ranks))}" if ranks else ""
    effective = max((m.effective_rank for m in info.modules), default=0)
    dora = Counter(p.dora_axis for p in report.placed if p.dora_axis) if report else Counter()
    dora_text = "".join(f", DoRA per {axis} ×{n}" for axis, n in sorted(dora.items()))
    text = f"LyCORIS {algorithms}{rank_text}, ΔW rank ≤ {effective}, scale convention {convention}{dora_text}"
    if report is not None:
        touched = sorted(
            report.touched().items(), key=lambda item: _ORDER.index(item[0]) if item[0] in _ORDER else 9
        )
        text += "; changes " + " + ".join(f"{n} {c}" for c, n in touched) + " weights"
        family = get_family(family_key)
        if family is not None and family.block_groups:
            modules = [
                p.module
                for placed in report.placed
                for p in placed.placements
                if p.component in family.denoisers
            ]
            if modules:
                text += f" ({blocks_touched(family, modules)})"
    return text


def _module_facts(info: LycorisInfo, report: PlacementReport | None) -> list[dict[str, Any]]:
    """Each module as ``plan --json`` lists it: algorithm, factor shapes by role, r, the largest rank
    ΔW can have, ΔW's shape, the DoRA kind and axis, and the base weights it changes (rows of a
    fused module's parts as ``[start:end]``)."""
    placed = {p.module.stem: p for p in report.placed} if report is not None else {}
    out = []
    for module in info.modules:
        entry: dict[str, Any] = {
            "stem": module.stem,
            "algorithm": module.algorithm,
            "factors": {role: list(shape) for role, shape in module.factors},
            "rank": module.rank,
            "effective_rank": module.effective_rank,
            "delta_shape": list(module.delta_shape),
        }
        where = placed.get(module.stem)
        if module.dora:
            entry["dora"] = {"kind": module.dora, "axis": where.dora_axis if where else module.dora_axis}
        if where is not None:
            entry["weights"] = [
                f"{p.component}.{p.key}" + (f"[{p.rows[0]}:{p.rows[1]}]" if p.rows else "")
                for p in where.placements
            ]
        out.append(entry)
    return out


def _placed(
    ctx: CompileContext, where: tuple[Any, ...], info: LycorisInfo, base: BaseInfo, family_key: str | None
) -> tuple[PlacementReport | None, bool]:
    """The adapter placed on the base (None: a single-file base, whose names are checked when loaded),
    and whether every module was: errors for modules that fit no weight and for those that fit but
    cannot be applied (each with its own reason; only the first suggests another base model)."""
    report = place_adapter(info, base_keys(base), get_family(family_key or base.family))
    ok, unnamed = True, bool(report.problems) and base.kind == "single_file"
    if unnamed:
        ctx.checks.append(
            Check(
                f"adapters.{where[1]}",
                "unchecked",
                f"{len(report.problems)} modules are not named in the base file's layout (a single "
                "file): checked when it is loaded",
            )
        )
    elif report.problems:
        ok = False
        kinds = "/".join(_LABELS.get(a, a) for a, _ in info.algorithms) or "adapter"
        ctx.error(
            where,
            f"cannot load this LoRA: {len(report.problems)} of {len(info.modules)} {kinds} modules find "
            f"no base weight they fit: {_listing(list(report.problems), len(report.problems))}",
            "is this adapter made for another base model?",
            on_key=True,
        )
    if report.refused:
        ok = False
        ctx.error(
            where,
            f"{len(report.refused)} of {len(info.modules)} modules cannot be applied: "
            f"{_listing(list(report.refused), len(report.refused))}",
            on_key=True,
        )
    return (None if unnamed else report), ok


def check_lycoris_adapter(
    ctx: CompileContext,
    name: str,
    spec: Any,
    info: LycorisInfo,
    base: BaseInfo | None,
    family_key: str | None,
    describe: str,
) -> None:
    """Every check of the module docstring for adapter ``name``; appends the plan check when it passes."""
    where = ("adapters", name)
    convention = lycoris_convention(info, spec.scale_convention)
    ok = _unclassified(ctx, where, info)
    _convention(ctx, where, info, convention)
    report = None
    if base is not None:
        report, placed = _placed(ctx, where, info, base, family_key)
        ok = ok and placed
    if ok:
        facts: list[tuple[str, Any]] = [
            ("format", "lycoris"),
            ("algorithms", dict(info.algorithms)),
            ("modules", len(info.modules)),
            ("components", tuple(sorted({m.component for m in info.modules}))),
            ("ranks", tuple(sorted({m.rank for m in info.modules if m.rank is not None}))),
            ("effective_rank", max((m.effective_rank for m in info.modules), default=0)),
            ("scale_convention", convention),
        ]
        if report is not None:
            facts.append(("weights_changed", report.touched()))
        facts.append(("per_module", _module_facts(info, report)))
        summary = _summary(info, report, convention, family_key)
        ctx.checks.append(Check(f"adapters.{name}", "ok", f"{describe}: {summary}", tuple(facts)))
