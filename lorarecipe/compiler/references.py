"""Checks that the recipe's sections refer to each other correctly, and the merge methods' rules.

Recipe + input facts -> located problems and the order in which merges must run. Names are
identities: an adapter and a merge may not share a name (PEFT would silently keep the first), a
merge may use earlier merges, weights must match their adapters, per-block weights must be ones
diffusers applies (it silently ignores dicts on text encoders and transformer models), and merge
methods that need equal ranks get unequal ranks flagged with a fix (``cat`` or an ``_svd`` form), and
a merge whose method would be silently replaced by ``linear`` in a component where only one of its
adapters has layers (PEFT's rule for a lone adapter) is refused with the shared components to use.
LyCORIS/DoRA adapters (applied by lorarecipe itself) can be fused, mixed and shown in grids, but
PEFT merges only LoRAs: in a merge they need method ``extract``, and a LoRA output writes them only
once extracted.
"""

from __future__ import annotations

import math
from typing import Any

from ..diagnostics import did_you_mean
from ..recipe.models import ComponentWeights, UnetBlockWeights
from ..recipe.vocabulary import COMBINATION_TYPES, FAMILIES, RESERVED_VARIANTS, lone_adapter_merge_is_exact
from .block_weights import check_transformer_blocks
from .context import CompileContext
from .difference import difference_components
from .inputs import InputFacts, component_ranks
from .lycoris import algorithm_names

__all__ = ["adapter_components", "check_references", "lycoris_kind", "merge_order"]


def _names(ctx: CompileContext) -> set[str]:
    return set(ctx.recipe.adapters) | set(ctx.recipe.merges)


def _ref(
    ctx: CompileContext, where: tuple[Any, ...], name: str, known: set[str], what: str = "adapter"
) -> bool:
    if name in known:
        return True
    hint = did_you_mean(name, known) or (f"known: {', '.join(sorted(known))}" if known else None)
    # in the mapping form ``adapters: {name: weight}`` the name is a key: point at the key
    on_key = where[-2:-1] == ("adapters",) and isinstance(where[-1], str)
    ctx.error(where, f"unknown {what} {name!r}", hint, on_key=on_key)
    return False


def _adapter_list_paths(spec: Any, section: tuple[Any, ...]) -> list[tuple[str, tuple[Any, ...]]]:
    """(name, recipe path of the name) for both the list and the mapping forms."""
    if isinstance(spec.adapters, dict):
        return [(n, (*section, "adapters", n)) for n in spec.adapters]
    return [(n, (*section, "adapters", i)) for i, n in enumerate(spec.adapters)]


def merge_order(ctx: CompileContext) -> list[str]:
    """Merges in dependency order (a merge may combine earlier merges); reports cycles."""
    merges = ctx.recipe.merges
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            cycle = " -> ".join([*trail[trail.index(name) :], name])
            ctx.error(("merges", name), f"merges form a cycle: {cycle}", on_key=True)
            return
        state[name] = "active"
        for dep, _ in merges[name].pairs():
            if dep in merges:
                visit(dep, [*trail, name])
        state[name] = "done"
        order.append(name)

    for name in merges:
        visit(name, [])
    return order


def _lora_ranks(
    inputs: InputFacts, ranks_of: dict[str, dict[str, tuple[int, ...]] | None], name: str
) -> dict[str, tuple[int, ...]] | None:
    if name in ranks_of:
        return ranks_of[name]
    facts = inputs.adapters.get(name)
    if facts is None or facts.info is None or facts.info.unsupported:
        return None
    return component_ranks(facts.info)


def _merged_ranks(
    ctx: CompileContext, method: str, inputs_ranks: list[dict[str, tuple[int, ...]]], svd_rank: int | None
) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    comps = {c for r in inputs_ranks for c in r}
    for comp in comps:
        present = [r[comp] for r in inputs_ranks if comp in r]
        if method == "cat":
            out[comp] = (sum(max(r) for r in present),)
        elif COMBINATION_TYPES[method].svd:
            out[comp] = (svd_rank or max(max(r) for r in present),)
        else:
            out[comp] = (max(max(r) for r in present),)
    return out


def _check_lone_components(
    ctx: CompileContext, name: str, adapters: list[str], ranks: list[dict[str, tuple[int, ...]]]
) -> None:
    """Refuse a component where only one of the merge's adapters has layers, unless PEFT's lone-adapter
    ``linear`` is the method's own result there (``lone_adapter_merge_is_exact``)."""
    spec = ctx.recipe.merges[name]
    comps = sorted({c for r in ranks for c in r})
    wanted = [c for c in comps if spec.components is None or c in spec.components]
    shared = [c for c in comps if all(c in r for r in ranks)]
    for comp in wanted:
        present = [(a, r[comp]) for a, r in zip(adapters, ranks, strict=True) if comp in r]
        if len(present) != 1:
            continue
        (alone, alone_ranks), missing = present[0], [a for a in adapters if a != present[0][0]]
        if lone_adapter_merge_is_exact(spec.method, spec.svd_rank, spec.svd_clamp, max(alone_ranks)):
            continue
        if missing:
            why = f"only {alone!r} has {comp} layers ({', '.join(repr(a) for a in missing)} has none)"
            if shared:
                hint = f"merge only where all adapters are: components: [{', '.join(shared)}]"
            else:
                hint = "these adapters share no component; use 'cat' or 'linear', or merge other adapters"
        else:
            why = f"it merges one adapter ({alone!r})"
            hint = "a merge of one adapter is its weighted copy: use method 'linear'"
        ctx.error(
            ("merges", name, "method"),
            f"method {spec.method!r} would not run in {comp}: {why}, and PEFT merges a lone adapter "
            "with 'linear', ignoring the method and its parameters",
            hint,
        )


def _module_sizes(ctx: CompileContext, inputs: InputFacts, name: str, seen: frozenset[str]) -> dict[str, int]:
    """``component.module`` -> the largest rank its delta can have (min(out, in·kernel)), for every
    module an adapter or merge adapts (a merge adapts the union of its inputs'), from the headers."""
    if name in ctx.recipe.merges and name not in seen:
        sizes: dict[str, int] = {}
        for dep, _ in ctx.recipe.merges[name].pairs():
            sizes.update(_module_sizes(ctx, inputs, dep, seen | {name}))
        return sizes
    facts = inputs.adapters.get(name)
    if facts is None or facts.info is None:
        return {}
    return {
        f"{m.component}.{m.name}": min(m.out_features, m.in_features * math.prod(m.kernel or (1,)))
        for m in facts.info.modules
    }


def _check_svd_rank(ctx: CompileContext, inputs: InputFacts, name: str, svd_rank: int) -> None:
    """An SVD merge re-factors every merged module's delta to ``svd_rank``: no module can have more
    than min(out, in) singular values, so a larger rank fails (or pads) at build time; refused here."""
    sizes = _module_sizes(ctx, inputs, name, frozenset())
    if not sizes:
        return
    smallest = min(sizes, key=lambda k: (sizes[k], k))
    if svd_rank > sizes[smallest]:
        ctx.error(
            ("merges", name, "svd_rank"),
            f"svd_rank {svd_rank} is larger than module {smallest} allows "
            f"(min(out, in) = {sizes[smallest]}; {len(sizes)} modules merged)",
            f"use svd_rank <= {sizes[smallest]}",
        )


def lycoris_kind(inputs: InputFacts, name: str) -> str | None:
    """'LyCORIS (LoKr (decomposed) ×350)' when adapter ``name`` is a file lorarecipe applies
    itself (LyCORIS/DoRA), else None (a plain LoRA, a merge, or a header not available yet)."""
    facts = inputs.adapters.get(name)
    lycoris = facts.info.lycoris if facts is not None and facts.info is not None else None
    if lycoris is None:
        return None
    return f"LyCORIS ({algorithm_names(lycoris)})"


def _lycoris_components(inputs: InputFacts, name: str) -> dict[str, tuple[int, ...]]:
    facts = inputs.adapters[name]
    assert facts.info is not None and facts.info.lycoris is not None
    return {m.component: (m.effective_rank,) for m in facts.info.lycoris.modules}


def _is_difference(ctx: CompileContext, name: str) -> bool:
    spec = ctx.recipe.adapters.get(name)
    return spec is not None and spec.checkpoint is not None


def _difference_ranks(inputs: InputFacts, name: str) -> dict[str, tuple[int, ...]] | None:
    facts = inputs.adapters.get(name)
    if facts is None or facts.difference is None:
        return None
    return {c: (0,) for c in difference_components(facts.difference, inputs.family)}


def _check_difference_uses(ctx: CompileContext) -> None:
    """A checkpoint difference is a full-rank ΔW of every weight: only ``extract`` turns it into an
    adapter; a mix, a fuse, a grid or a LoRA output of it is refused where it is named."""
    names = {n for n in ctx.recipe.adapters if _is_difference(ctx, n)}
    if not names:
        return

    uses: list[tuple[tuple[Any, ...], str]] = []
    if ctx.recipe.set_adapters is not None:
        uses += [(p, n) for n, p in _adapter_list_paths(ctx.recipe.set_adapters, ("set_adapters",))]
    if ctx.recipe.fuse is not None:
        uses += [(("fuse", "adapters", i), n) for i, n in enumerate(ctx.recipe.fuse.adapters or [])]
    for output, spec in ctx.recipe.outputs.items():
        if spec.kind == "lora":
            uses.append((("outputs", output, "adapter"), spec.adapter))
        elif spec.kind == "grid":
            uses += [(("outputs", output, "variants", i), v) for i, v in enumerate(spec.variants)]
            if spec.sweep is not None and spec.sweep.adapter:
                uses.append((("outputs", output, "sweep", "adapter"), spec.sweep.adapter))
    for path, name in uses:
        if name in names:
            hint = (
                f"extract it first (a merge with method: extract, adapters: [{name}], svd_rank) and use that"
            )
            ctx.error(path, f"{name!r} is a checkpoint difference, which only an 'extract' merge takes", hint)


def _check_extract(
    ctx: CompileContext, inputs: InputFacts, name: str, per_input: list[dict[str, tuple[int, ...]] | None]
) -> dict[str, tuple[int, ...]] | None:
    """An ``extract`` merge takes any adapters; its result is a LoRA of rank svd_rank in every component
    its inputs adapt (``components`` may narrow them). A module whose delta has a lower rank than
    svd_rank gets that rank: its SVD is exact there."""
    spec = ctx.recipe.merges[name]
    if any(r is None for r in per_input):
        return None
    assert spec.svd_rank is not None
    comps = {c for r in per_input if r is not None for c in r}
    if spec.components:
        comps &= set(spec.components)
    if not comps:
        ctx.error(("merges", name, "components"), "none of the merged adapters adapts these components")
    return {c: (spec.svd_rank,) for c in comps}


def _check_merges(ctx: CompileContext, inputs: InputFacts) -> list[str]:
    known = _names(ctx)
    order = merge_order(ctx)
    ranks_of: dict[str, dict[str, tuple[int, ...]] | None] = {}
    family = inputs.family
    for name in order:
        spec = ctx.recipe.merges[name]
        where = ("merges", name)
        rule = COMBINATION_TYPES[spec.method]
        refs_ok = all(_ref(ctx, p, n, known - {name}) for n, p in _adapter_list_paths(spec, where))
        lycoris = [(n, kind) for n, _ in spec.pairs() if (kind := lycoris_kind(inputs, n))]
        if spec.components and family:
            for i, comp in enumerate(spec.components):
                if comp not in FAMILIES[family].lora_components:
                    ctx.error(
                        (*where, "components", i),
                        f"{FAMILIES[family].label} has no LoRA component {comp!r}",
                        f"components: {', '.join(FAMILIES[family].lora_components)}",
                    )
        if not refs_ok:
            ranks_of[name] = None
            continue
        if rule.peft and lycoris:
            adapter, kind = lycoris[0]
            ctx.error(
                (*where, "method"),
                f"{adapter!r} is a {kind} adapter, and PEFT's add_weighted_adapter ({spec.method!r}) merges "
                "only LoRAs",
                "use method: extract (a truncated SVD of the summed deltas into a plain LoRA; set svd_rank), "
                "or fuse the adapter directly",
            )
            ranks_of[name] = None
            continue
        lycoris_names = {n for n, _ in lycoris}
        differences = [n for n, _ in spec.pairs() if _is_difference(ctx, n)]
        if rule.peft and differences:
            ctx.error(
                (*where, "method"),
                f"{differences[0]!r} is a checkpoint difference, which only an 'extract' merge takes",
                "use method: extract (with svd_rank)",
            )
            ranks_of[name] = None
            continue
        per_input = [
            _lycoris_components(inputs, n)
            if n in lycoris_names
            else _difference_ranks(inputs, n)
            if n in differences
            else _lora_ranks(inputs, ranks_of, n)
            for n, _ in spec.pairs()
        ]
        if not rule.peft:
            ranks_of[name] = _check_extract(ctx, inputs, name, per_input)
            continue
        if any(r is None for r in per_input):
            ranks_of[name] = None
            continue
        known_ranks = [r for r in per_input if r is not None]
        _check_lone_components(ctx, name, [n for n, _ in spec.pairs()], known_ranks)
        if rule.equal_ranks and len(known_ranks) > 1:
            for comp in sorted({c for r in known_ranks for c in r}):
                seen = {n: r[comp] for (n, _), r in zip(spec.pairs(), known_ranks, strict=True) if comp in r}
                distinct = {x for ranks in seen.values() for x in ranks}
                if len(distinct) > 1:
                    listing = ", ".join(f"{n} r{'/'.join(map(str, r))}" for n, r in seen.items())
                    ctx.error(
                        (*where, "method"),
                        f"method {spec.method!r} needs equal ranks, but the {comp} ranks differ ({listing})",
                        f"use 'cat' (exact, rank = sum) or '{spec.method}_svd'"
                        if f"{spec.method}_svd" in COMBINATION_TYPES
                        else "use 'cat' or 'svd'",
                    )
                    break
        if rule.svd and spec.svd_rank is not None:
            _check_svd_rank(ctx, inputs, name, spec.svd_rank)
        ranks_of[name] = _merged_ranks(ctx, spec.method, known_ranks, spec.svd_rank)
    ctx.facts["merge_ranks"] = ranks_of
    return order


def adapter_components(
    ctx: CompileContext, inputs: InputFacts, name: str, seen: frozenset[str] = frozenset()
) -> set[str] | None:
    """The components one adapter or merge adapts (as loaded: ``load_into`` moves a file's modules to
    the experts it names), from the LoRA headers; None when unknown yet (an uncached hub LoRA)."""
    merge = ctx.recipe.merges.get(name)
    if merge is None or name in seen:
        facts = inputs.adapters.get(name)
        if facts is not None and facts.difference is not None:
            return set(difference_components(facts.difference, inputs.family))
        return set(facts.info.components) if facts is not None and facts.info is not None else None
    found: set[str] = set()
    for dep, _ in merge.pairs():
        part = adapter_components(ctx, inputs, dep, seen | {name})
        if part is None:
            return None
        found |= part
    return found & set(merge.components) if merge.components else found


def _check_expert_weight(
    ctx: CompileContext, where: tuple[Any, ...], name: str, weight: ComponentWeights, inputs: InputFacts
) -> None:
    """A weight for an expert the adapter is not loaded into would be ignored by diffusers (a warning)."""
    info = FAMILIES.get(inputs.family or "")
    loaded = adapter_components(ctx, inputs, name) if info is not None and info.experts else None
    if loaded is None or info is None:
        return
    for comp in info.experts:
        if comp not in loaded and getattr(weight, comp) is not None:
            ctx.error(
                (*where, comp),
                f"{name!r} is loaded into {', '.join(sorted(loaded)) or 'nothing'} only, not {comp}: "
                "diffusers would ignore this weight",
                f"add {comp} to the adapter's load_into, or remove this weight",
                on_key=True,
            )


def _check_weight(ctx: CompileContext, where: tuple[Any, ...], weight: Any, inputs: InputFacts) -> None:
    if not isinstance(weight, ComponentWeights):
        return
    info = FAMILIES.get(inputs.family or "")
    for comp in ("unet", "transformer", "transformer_2", "text_encoder", "text_encoder_2", "text_encoder_3"):
        value = getattr(weight, comp)
        if value is None:
            continue
        if info is not None and comp not in info.lora_components:
            ctx.error(
                (*where, comp),
                f"{info.label} has no LoRA component {comp!r}",
                did_you_mean(comp, info.lora_components) or f"components: {', '.join(info.lora_components)}",
                on_key=True,
            )
        if (
            comp == "unet"
            and isinstance(value, UnetBlockWeights)
            and info is not None
            and info.denoiser != "unet"
        ):
            ctx.error(
                (*where, comp),
                "per-block weights only work on UNet models (diffusers ignores them on transformers)",
                on_key=True,
            )
        if (
            comp in ("transformer", "transformer_2")
            and isinstance(value, dict)
            and (info is None or comp in info.lora_components)
        ):
            check_transformer_blocks(ctx, (*where, comp), value, inputs)


def _check_mix_and_fuse(ctx: CompileContext, inputs: InputFacts) -> None:
    known = _names(ctx)
    mix = ctx.recipe.set_adapters
    if mix is not None:
        for name, path in _adapter_list_paths(mix, ("set_adapters",)):
            _ref(ctx, path, name, known)
        for i, (_name, weight) in enumerate(mix.pairs()):
            if isinstance(mix.adapters, dict):
                where: tuple[Any, ...] = ("set_adapters", "adapters", _name)
            elif isinstance(mix.weights, list):
                where = ("set_adapters", "weights", i)
            else:
                where = ("set_adapters", "weights")
            _check_weight(ctx, where, weight, inputs)
            if isinstance(weight, ComponentWeights):
                _check_expert_weight(ctx, where, _name, weight, inputs)
    fuse = ctx.recipe.fuse
    if fuse is not None:
        if fuse.adapters is None and mix is None:
            ctx.error(("fuse",), "nothing to fuse: give 'fuse.adapters' or a 'set_adapters' mix", on_key=True)
        for i, name in enumerate(fuse.adapters or []):
            _ref(ctx, ("fuse", "adapters", i), name, known)
        if fuse.components and inputs.family:
            comps = FAMILIES[inputs.family].lora_components
            for i, comp in enumerate(fuse.components):
                if comp not in comps:
                    ctx.error(
                        ("fuse", "components", i),
                        f"{FAMILIES[inputs.family].label} has no LoRA component {comp!r}",
                        f"components: {', '.join(comps)}",
                    )


def _check_lora_outputs(ctx: CompileContext, inputs: InputFacts) -> None:
    """A LoRA output writes a plain LoRA: a LyCORIS/DoRA adapter must be extracted into one first."""
    for name, spec in ctx.recipe.outputs.items():
        adapter = getattr(spec, "adapter", None)
        kind = lycoris_kind(inputs, adapter) if spec.kind == "lora" and adapter else None
        if kind is not None:
            ctx.error(
                ("outputs", name, "adapter"),
                f"{adapter!r} is a {kind} adapter; a 'lora' output writes a plain LoRA (lora_A/lora_B)",
                f"add a merge with method: extract, adapters: [{adapter}] and svd_rank, and write that merge",
            )


def check_references(ctx: CompileContext, inputs: InputFacts) -> list[str]:
    """All cross-reference checks; returns the merge order."""
    for name in ctx.recipe.merges:
        if name in ctx.recipe.adapters:
            ctx.error(
                ("merges", name),
                f"merge name {name!r} is already an adapter name (PEFT would silently "
                "keep the adapter and skip the merge)",
                "give the merge its own name",
                on_key=True,
            )
    for section in ("adapters", "merges"):
        for name in getattr(ctx.recipe, section):
            if name in RESERVED_VARIANTS:
                ctx.error(
                    (section, name),
                    f"{name!r} is reserved for grid variants ({RESERVED_VARIANTS[name]})",
                    "choose another name",
                    on_key=True,
                )
    order = _check_merges(ctx, inputs)
    _check_mix_and_fuse(ctx, inputs)
    _check_lora_outputs(ctx, inputs)
    _check_difference_uses(ctx)
    return order
