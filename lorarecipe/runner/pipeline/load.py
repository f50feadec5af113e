"""Load the base model as a diffusers pipeline, safely and without silent dtype changes.

Resolved base (folder or single file) -> pipeline on the chosen device. The pipeline class comes
from the family (never from code in the model folder), ``model_index.json`` may only name
diffusers/transformers classes (it is untrusted: diffusers imports whatever library it names),
weights are safetensors only, and ``dtype: auto`` keeps the stored dtype (diffusers would upcast an
fp16 checkpoint to fp32 without ``dtype``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import BuildError
from ...inspect import read_header
from ...inspect.base_model import check_model_index
from ...plan import LoadBase
from ...recipe.vocabulary import FAMILIES

__all__ = ["load_dtype", "load_pipeline"]

_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def stored_dtype(folder: Path, denoiser: str, variant: str | None) -> str | None:
    """The floating dtype of the stored denoiser weights (majority of tensors)."""
    names = [f"diffusion_pytorch_model.{variant}.safetensors"] if variant else []
    names.append("diffusion_pytorch_model.safetensors")
    for name in names:
        path = folder / denoiser / name
        if path.is_file():
            counts: dict[str, int] = {}
            for info in read_header(path).tensors.values():
                if info.dtype in _DTYPE:
                    counts[info.dtype] = counts.get(info.dtype, 0) + 1
            if counts:
                return _DTYPE[max(counts, key=lambda k: counts[k])]
    index = (
        sorted((folder / denoiser).glob("*.safetensors.index.json")) if (folder / denoiser).is_dir() else []
    )
    if index:
        shards = sorted((folder / denoiser).glob("*.safetensors"))
        if shards:
            return stored_dtype_of_file(shards[0])
    return None


def stored_dtype_of_file(path: Path) -> str | None:
    counts: dict[str, int] = {}
    for info in read_header(path).tensors.values():
        if info.dtype in _DTYPE:
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
    return _DTYPE[max(counts, key=lambda k: counts[k])] if counts else None


def load_dtype(step: LoadBase, path: Path) -> str:
    """The dtype a base is loaded in, by both executors: the recipe's, else the stored dtype of the
    denoiser (majority of its tensors), else float32. Header-only."""
    if step.dtype != "auto":
        return step.dtype
    if step.single_file:
        return stored_dtype_of_file(path) or "float32"
    index = check_model_index(path)
    denoiser = "unet" if "unet" in index else "transformer"
    return stored_dtype(path, denoiser, step.variant) or "float32"


def _components_outside_the_file(
    family: str, index: dict[str, Any], config: Path, dtype: Any
) -> dict[str, Any]:
    """Models a family's single file does not hold (FLUX.1's holds the transformer only), loaded from
    the config folder: diffusers' from_single_file refuses to build them from an absent checkpoint."""
    import diffusers
    import transformers

    held = set(FAMILIES[family].single_file_components)
    out: dict[str, Any] = {}
    for component, entry in index.items():
        if component.startswith("_") or component in held or not isinstance(entry, list) or entry[0] is None:
            continue
        library = {"diffusers": diffusers, "transformers": transformers}.get(entry[0])
        cls = getattr(library, entry[1], None) if library is not None else None
        if (
            cls is None
            or not hasattr(cls, "from_pretrained")
            or not (config / component / "config.json").is_file()
        ):
            continue  # tokenizers and schedulers: from_single_file takes them from the config folder
        out[component] = cls.from_pretrained(
            str(config / component), dtype=dtype, local_files_only=True, use_safetensors=True
        )
    return out


def _from_model_files(family: str, path: Path, config: Path | None, dtype: Any) -> Any:
    """A single file whose pipeline class has no ``from_single_file`` (Qwen-Image, FLUX.2, Wan): each
    model the file holds through its own class's ``from_single_file`` (diffusers' reader of the
    original layout), the rest of the pipeline from the config folder, as the folder's own pipeline
    class."""
    import diffusers

    info = FAMILIES[family]
    if config is None:
        raise BuildError(f"a {info.label} single file loads with 'config:' naming a diffusers folder of it")
    index = check_model_index(config)
    if index["_class_name"] not in info.pipeline_classes:
        raise BuildError(f"the config folder holds a {index['_class_name']}, not a {info.label} pipeline")
    models: dict[str, Any] = {}
    for component in info.single_file_components:
        entry = index.get(component)
        model_cls = None
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == "diffusers":
            model_cls = getattr(diffusers, entry[1], None)
        if model_cls is None or not hasattr(model_cls, "from_single_file"):
            raise BuildError(f"{config}: its {component} class cannot read a single file")
        models[component] = model_cls.from_single_file(
            str(path), config=str(config), subfolder=component, torch_dtype=dtype, local_files_only=True
        )
    pipe_cls = getattr(diffusers, index["_class_name"])
    return pipe_cls.from_pretrained(
        str(config), **models, dtype=dtype, use_safetensors=True, local_files_only=True
    )


def load_pipeline(step: LoadBase, path: Path, config: Path | None, device: str) -> tuple[Any, str]:
    """Load the base; returns (pipeline, dtype name actually used)."""
    import diffusers

    from .save import torch_dtype

    family = step.family
    dtype = load_dtype(step, path)
    if step.single_file:
        if family is None:
            raise BuildError("a single-file base needs 'family' (it cannot be detected from this file)")
        cls = getattr(diffusers, FAMILIES[family].pipeline_class)
        kwargs: dict[str, Any] = {"torch_dtype": torch_dtype(dtype), "local_files_only": True}
        if not hasattr(cls, "from_single_file"):  # Qwen-Image, FLUX.2, Wan: the models read the file
            pipe = _from_model_files(family, path, config, torch_dtype(dtype))
        else:
            if config is not None:
                index = check_model_index(config)
                kwargs["config"] = str(config)
                kwargs.update(_components_outside_the_file(family, index, config, torch_dtype(dtype)))
            pipe = cls.from_single_file(str(path), **kwargs)
    else:
        index = check_model_index(path)
        cls_name = index["_class_name"]
        if family is not None and cls_name not in FAMILIES[family].pipeline_classes:
            raise BuildError(f"the base folder holds a {cls_name}, but the recipe's family is {family}")
        cls = getattr(diffusers, cls_name)
        pipe = cls.from_pretrained(
            str(path),
            dtype=torch_dtype(dtype),
            variant=step.variant,
            use_safetensors=True,
            local_files_only=True,
        )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe, dtype
