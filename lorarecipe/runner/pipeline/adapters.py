"""Load one LoRA file into a pipeline, refusing every way it could silently load as nothing.

LoRA file -> adapter ``name`` injected into the pipeline, with every tensor of the file accounted
for. Before diffusers sees the file: the header is validated, unsupported layouts (cloneofsimo,
LyCORIS, DoRA, malformed kohya) are refused with the reason, every tensor must be finite, and the
old attention-processor layout (which diffusers 0.42 loads as nothing) is converted to the PEFT
layout, and so are LoRAs named in a family's original layout (FLUX.1's kohya/ai-toolkit/XLabs files:
``runner.lora_conversion``). After loading, the LoRA modules injected per component must equal the
modules in the file.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import BuildError, UnsafeInputError
from ...families import Family, get_family
from ...inspect import LoraInfo, inspect_lora, read_header
from ...inspect.loaded_as import as_loaded
from ..lora_conversion import convert_original_lora, is_original_layout

__all__ = ["LoadedAdapter", "check_experts", "check_injected", "load_adapter"]

_ATTN_PROC = re.compile(
    r"^(?:unet\.)?(?P<module>.+)\.processor\.(?P<proj>to_[qkv]|to_out)_lora\.(?P<which>down|up)\.weight$"
)
_ATTN_PROC_TE = re.compile(
    r"^text_encoder\.(?P<module>.+)\.(?P<proj>to_[qkv]|to_out)_lora\.(?P<which>down|up)\.weight$"
)
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    path: Path
    info: LoraInfo
    modules: dict[str, int]  # component -> number of injected LoRA modules


def convert_attn_procs(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Old diffusers attention-processor keys -> PEFT keys diffusers loads.

    ``…attn1.processor.to_k_lora.down.weight`` -> ``unet.…attn1.to_k.lora_A.weight`` (``to_out`` ->
    ``to_out.0``). These files carry no alpha, so alpha = rank, as when they were trained.
    """
    out: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        te = _ATTN_PROC_TE.match(key)
        match = te or _ATTN_PROC.match(key)
        if match is None:
            raise UnsafeInputError(f"unexpected key {key!r} in an attention-processor LoRA file")
        which = "lora_A" if match["which"] == "down" else "lora_B"
        if te is not None:
            out[f"text_encoder.{te['module']}.{_TE_PROJ[te['proj']]}.{which}.weight"] = tensor
        else:
            proj = "to_out.0" if match["proj"] == "to_out" else match["proj"]
            out[f"unet.{match['module']}.{proj}.{which}.weight"] = tensor
    return out


def _check_finite(state_dict: dict[str, Any], source: str) -> None:
    import torch

    plain = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point():
            continue
        values = tensor if tensor.dtype in plain else tensor.float()  # isfinite has no fp8 kernels
        if not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            raise UnsafeInputError(
                f"{source}: tensor {key!r} contains {bad} NaN/Inf values; refusing to load it"
            )


def injected_modules(model: Any, name: str) -> set[str]:
    """Names of the modules of ``model`` that carry a LoRA layer for adapter ``name``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = set()
    for module_name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and name in getattr(module, "lora_A", {}):
            found.add(module_name)
    return found


def _normal(name: str) -> str:
    """Module names in a comparable form (kohya underscores, no ``text_model`` segment)."""
    flat = name.replace(".", "_")
    return flat[len("text_model_") :] if flat.startswith("text_model_") else flat


def _file_modules(info: LoraInfo) -> dict[str, set[str]]:
    expected: dict[str, set[str]] = {}
    for module in info.modules:
        expected.setdefault(module.component, set()).add(module.name)
    return expected


def _converted_modules(state_dict: dict[str, Any]) -> dict[str, set[str]]:
    """``<component>.<module>.lora_A.weight`` keys -> {component: modules}."""
    expected: dict[str, set[str]] = {}
    for key in state_dict:
        if key.endswith(".lora_A.weight"):
            component, _, module = key[: -len(".lora_A.weight")].partition(".")
            expected.setdefault(component, set()).add(module)
    return expected


def check_injected(pipe: Any, name: str, expected: dict[str, set[str]], source: str) -> dict[str, int]:
    """The LoRA modules diffusers injected for adapter ``name`` must be the ``expected`` ones (per
    component), or the build fails naming what would be silently ignored; returns the counts."""
    counts: dict[str, int] = {}
    missing: list[str] = []
    for component, names in expected.items():
        model = getattr(pipe, component, None)
        if model is None:
            missing.extend(f"{component}.{n}" for n in sorted(names)[:5])
            counts[component] = 0
            continue
        got = injected_modules(model, name)
        counts[component] = len(got)
        if len(got) < len(names):
            have = {_normal(g) for g in got}
            lost = [n for n in sorted(names) if _normal(n) not in have] or sorted(names)[
                : len(names) - len(got)
            ]
            missing.extend(f"{component}.{n}" for n in lost)
    if missing:
        total = sum(len(v) for v in expected.values())
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise BuildError(
            f"{source}: {len(missing)} of {total} LoRA modules were not applied by diffusers (they would be "
            f"silently ignored): {shown}. Is this LoRA made for this base model?"
        )
    return counts


def _discard(pipe: Any, name: str) -> None:
    """Remove whatever part of adapter ``name`` a failed load injected."""
    import contextlib

    for comp in getattr(pipe, "_lora_loadable_modules", []):
        model = getattr(pipe, comp, None)
        if model is not None and name in (getattr(model, "peft_config", None) or {}):
            with contextlib.suppress(Exception):
                if hasattr(model, "delete_adapters"):
                    model.delete_adapters([name])
                else:
                    model.delete_adapter(name)


def _into_experts(
    expected: dict[str, set[str]], denoiser: str, experts: tuple[str, ...]
) -> dict[str, set[str]]:
    """Expected modules per component once the denoiser's are loaded into ``experts`` instead."""
    out = {c: m for c, m in expected.items() if c != denoiser}
    for expert in experts:
        out[expert] = set(expected.get(denoiser, set()))
    return out


def check_experts(pipe: Any, known: Family | None, load_into: Sequence[str] | None, file: str) -> None:
    """A base with two experts needs ``load_into`` naming experts it has (a hub base is checked only
    once it is loaded: the compiler checks the others)."""
    present = [e for e in (known.experts if known is not None else ()) if getattr(pipe, e, None) is not None]
    if load_into is None and len(present) > 1:
        raise BuildError(
            f"{file}: the base has two experts ({', '.join(present)}: high-noise and low-noise steps); "
            "say which this LoRA is loaded into with load_into"
        )
    if load_into is not None and any(e not in present for e in load_into):
        raise BuildError(f"{file}: load_into {list(load_into)}, but the base's denoisers are {present}")


def load_adapter(
    pipe: Any, name: str, path: Path, family: str | None = None, load_into: tuple[str, ...] | None = None
) -> LoadedAdapter:
    """Validate, convert if needed, load into ``pipe`` as adapter ``name``, and verify coverage.

    ``family``: the base's family, whose original-layout LoRA names lorarecipe converts itself;
    ``load_into``: the experts the file goes into (Wan 2.2 A14B; default: the family's denoiser)."""
    from safetensors.torch import load_file, save_file

    header = read_header(path)
    known = get_family(family)
    info = as_loaded(inspect_lora(header, family), known)
    if info.unsupported:
        raise UnsafeInputError(f"{path.name}: cannot load this LoRA: {info.unsupported}")
    if info.unrecognized_keys:
        raise UnsafeInputError(
            f"{path.name}: {len(info.unrecognized_keys)} tensors belong to no LoRA module and would "
            f"be dropped: {', '.join(info.unrecognized_keys[:5])}"
        )
    state_dict = load_file(str(path))
    _check_finite(state_dict, path.name)
    expected = _file_modules(info)
    source: str | dict[str, Any] = str(path)
    if known is not None and is_original_layout(known, state_dict):
        modules = {  # the denoiser's too where the original layout keeps diffusers names
            c: [n for n, _ in getattr(pipe, c).named_modules()]
            for c in known.lora_components
            if (c not in known.denoisers or known.original_keeps_names) and getattr(pipe, c, None) is not None
        }
        source = convert_original_lora(known, state_dict, modules, path.name)
        expected = _converted_modules(source)
    check_experts(pipe, known, load_into, path.name)
    targets = load_into or ((known.denoiser,) if known is not None else ("",))
    if known is not None and load_into:
        expected = _into_experts(expected, known.denoiser, load_into)
    with tempfile.TemporaryDirectory(prefix="lorarecipe-adapter-") as tmp:
        if info.format == "attn_procs":
            source = str(Path(tmp) / "converted.safetensors")
            save_file(convert_attn_procs(state_dict), source)
        del state_dict
        try:
            with warnings.catch_warnings():
                if known is not None and known.image_modules:
                    # diffusers gives a T2V LoRA zero image cross-attention factors on a Wan I2V base
                    # (_maybe_expand_t2v_lora_for_i2v) that PEFT then leaves out: a no-op, not a loss
                    # (check_injected below refuses any module of the file left out)
                    warnings.filterwarnings("ignore", "While injecting the PEFT adapters, an inconsistency")
                for index, target in enumerate(targets):  # one load per expert (else the one denoiser)
                    kwargs: dict[str, Any] = (
                        {"load_into_transformer_2": True} if target == "transformer_2" else {}
                    )
                    if isinstance(source, dict):  # each expert its own tensors (PEFT may keep them as given)
                        given = source if index == 0 else {k: v.clone() for k, v in source.items()}
                        pipe.load_lora_weights(given, adapter_name=name, **kwargs)
                    else:
                        pipe.load_lora_weights(
                            source, adapter_name=name, use_safetensors=True, local_files_only=True, **kwargs
                        )
        except Exception as exc:  # a file diffusers cannot read must not leave half an adapter
            _discard(pipe, name)
            raise UnsafeInputError(
                f"{path.name}: diffusers could not load this LoRA: {type(exc).__name__}: {str(exc)[:500]}"
            ) from None
    counts = check_injected(pipe, name, expected, path.name)
    return LoadedAdapter(name, path, info, counts)
