"""Write pipeline-route outputs atomically: fused diffusers folder, single file, LoRA files.

Pipeline (+ adapter name) -> files at their final paths, each written to a temporary sibling and
renamed into place, safetensors only, with provenance in every file's ``__metadata__``. LoRA files
in diffusers layout go through diffusers' ``save_lora_weights`` (with ``lora_adapter_metadata`` so
alpha survives); kohya layout is written from the PEFT layers themselves (``kohya_export``), with each
module's own alpha (diffusers' ``convert_state_dict_to_kohya`` assumes alpha = rank).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ...errors import BuildError
from ...fs.atomic import atomic_dir, atomic_file
from ...outputs.safetensors_meta import add_metadata, canonicalize_header, jsonable
from .kohya_export import kohya_state_dict

__all__ = [
    "cast_pipeline",
    "refuse_overflow",
    "save_lora",
    "save_pipeline",
    "save_single_file",
    "torch_dtype",
]


def refuse_overflow(tensors: Mapping[str, Any], dtype: Any, what: str) -> None:
    """Refuse casting tensors to a narrower float dtype when a finite value would become Inf,
    naming the tensors (like NaN/Inf inputs are refused)."""
    import torch

    largest = torch.finfo(dtype).max
    bad = [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point()
        and torch.finfo(tensor.dtype).max > largest
        and tensor.numel()
        and float(tensor.detach().abs().max()) > largest
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise BuildError(
            f"{what}: {len(bad)} tensors overflow {str(dtype).removeprefix('torch.')} (values beyond "
            f"±{largest:.6g} would become Inf): {shown}; choose a wider dtype or lower the weights"
        )


def cast_pipeline(pipe: Any, dtype_name: str) -> None:
    """``pipe.to(dtype)`` after refusing every weight the cast would overflow."""
    import torch

    dtype = torch_dtype(dtype_name)
    for name, model in pipe.components.items():
        if isinstance(model, torch.nn.Module):
            refuse_overflow(dict(model.state_dict()), dtype, name)
    pipe.to(dtype)


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _stamp_folder(folder: Path, metadata: Mapping[str, str]) -> None:
    for file in sorted(folder.rglob("*")):
        if file.suffix in (".bin", ".pt", ".ckpt", ".pth"):
            raise BuildError(f"refusing to publish a pickle file: {file.name}")
        if file.suffix == ".safetensors":
            add_metadata(file, metadata)


def _scrub_configs(folder: Path, name: str | None) -> None:
    """Replace the machine-specific ``_name_or_path`` (a cache path) in saved configs.

    diffusers records the folder a model was loaded from; keeping it would make two machines'
    builds differ. It becomes the base's hub id when there is one, and is dropped otherwise.
    """
    import json

    for file in sorted(folder.rglob("*.json")):
        data = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "_name_or_path" not in data:
            continue
        if name:
            data["_name_or_path"] = name
        else:
            del data["_name_or_path"]
        file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_pipeline(
    pipe: Any,
    final: Path,
    metadata: Mapping[str, str],
    name: str | None = None,
    before_swap: Callable[[Path], None] | None = None,
) -> None:
    """``save_pretrained`` (safetensors only) into a temporary folder that replaces ``final``;
    ``before_swap(folder)`` completes it first (its model card)."""
    with atomic_dir(final) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        _scrub_configs(tmp, name)
        _stamp_folder(tmp, metadata)
        if before_swap is not None:
            before_swap(tmp)


def _config_dict(model: Any) -> dict[str, Any]:
    config = model.config
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def save_single_file(
    pipe: Any,
    family: str,
    final: Path,
    metadata: Mapping[str, str],
    fused: tuple[str, ...] = (),
    expert: str | None = None,
) -> None:
    """The fused pipeline as one original-layout .safetensors file: LDM/SGM (SD 1.x, SD 2.x, SDXL),
    BFL (FLUX.1, FLUX.2: transformer only) or Wan's (one expert: ``expert``, default the
    ``transformer``). ``fused``: the components the fuse changed, all of which the file must hold (a
    FLUX.1 file has no text encoder: a fused one would be lost) but the other expert's."""
    from safetensors.torch import save_file

    from ...families import FAMILIES
    from ...outputs.singlefile import to_single_file_state_dict

    info = FAMILIES[family]
    components = info.single_file_components
    lost = [c for c in fused if c not in components and c not in info.experts]
    if lost:
        raise BuildError(
            f"a {info.label} single file holds {', '.join(components)} only, but the fuse also "
            f"changed {', '.join(lost)}; fuse only {', '.join(components)} or write a pipeline output"
        )
    source: dict[str, str] = {info.denoiser: expert} if expert else {}
    state_dicts = {
        c: getattr(pipe, source.get(c, c)).state_dict()
        for c in components
        if getattr(pipe, source.get(c, c), None) is not None
    }
    configs = {c: _config_dict(getattr(pipe, source.get(c, c))) for c in state_dicts}
    tensors = to_single_file_state_dict(family, state_dicts, configs)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_file(final) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
        canonicalize_header(tmp)


def _lora_models(pipe: Any, adapter: str, family: str | None, component: str | None) -> dict[str, Any]:
    """File component name -> the model whose layers of ``adapter`` it holds. One expert of a family
    with two is written under the denoiser's name (``component``, else the only expert with it)."""
    from ...families import get_family

    info = get_family(family)
    experts = info.experts if info is not None else ()
    out: dict[str, Any] = {}
    for comp in getattr(pipe, "_lora_loadable_modules", []):
        model = getattr(pipe, comp, None)
        if model is not None and adapter in (getattr(model, "peft_config", None) or {}):
            out[comp] = model
    if info is None or not experts:
        return out
    holding = [e for e in experts if e in out]
    chosen = component or (holding[0] if len(holding) == 1 else None)
    if chosen is None or chosen not in out:
        where = ", ".join(holding) or "no expert"
        raise BuildError(
            f"adapter {adapter!r} is in {where}; a LoRA file holds one expert: set the output's component"
        )
    return {**{c: m for c, m in out.items() if c not in experts}, info.denoiser: out[chosen]}


def save_lora(
    pipe: Any,
    adapter: str,
    layout: str,
    final_dir: Path,
    weight_name: str,
    family: str | None,
    metadata: Mapping[str, str],
    dtype: str | None = None,
    before_swap: Callable[[Path], None] | None = None,
    component: str | None = None,
) -> Path:
    """Save one adapter as ``final_dir/weight_name`` (``before_swap(folder)`` completes the folder
    before it replaces the final one: its model card); returns the file path. ``component``: the expert
    whose layers are written, for a family with two (Wan 2.2 A14B: a LoRA file holds one expert's
    layers under the ``transformer`` names, loaded with ``load_into_transformer_2`` for the second)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    cast = torch_dtype(dtype) if dtype else None
    models = _lora_models(pipe, adapter, family, component)
    with atomic_dir(final_dir) as tmp:
        target = tmp / weight_name
        if layout == "kohya":
            tensors = kohya_state_dict(pipe, adapter, family, models)
            if cast is not None:
                refuse_overflow(tensors, cast, f"LoRA {adapter!r}")
                tensors = {k: v.to(cast) if v.is_floating_point() else v for k, v in tensors.items()}
            save_file(tensors, str(target), metadata={"format": "pt", **metadata})
            canonicalize_header(target)
        else:
            kwargs: dict[str, Any] = {}
            for comp, model in models.items():
                layers = get_peft_model_state_dict(model, adapter_name=adapter)
                layers = {k: v.contiguous() for k, v in layers.items()}  # SVD merges: non-contiguous
                if cast is not None:
                    refuse_overflow(layers, cast, f"LoRA {adapter!r} ({comp})")
                    layers = {k: v.to(cast) for k, v in layers.items()}
                kwargs[f"{comp}_lora_layers"] = layers
                kwargs[f"{comp}_lora_adapter_metadata"] = jsonable(model.peft_config[adapter].to_dict())
            if not kwargs:
                raise BuildError(f"adapter {adapter!r} is not loaded in any component")
            type(pipe).save_lora_weights(str(tmp), weight_name=weight_name, safe_serialization=True, **kwargs)
            add_metadata(target, metadata)
        if before_swap is not None:
            before_swap(tmp)
    return final_dir / weight_name
