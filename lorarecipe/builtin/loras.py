"""Write random, seeded LoRA files for a diffusers pipeline, in the two layouts found in the wild.

Input: a pipeline (only its module names and shapes are used), an output file, rank/alpha/seed.
Output: one ``.safetensors`` file, byte-identical for equal inputs. The pipeline is left as it was.

- :func:`make_peft_lora` goes through peft + ``save_lora_weights`` (keys ``unet.<module>.lora_A.weight``,
  alpha kept in the ``lora_adapter_metadata`` header; without it diffusers would load alpha = r).
- :func:`make_kohya_lora` writes kohya/A1111 keys directly (``lora_unet_….lora_down.weight``, ``.alpha``).

Used by the built-in LoRAs and by tests that need LoRA files of a given shape.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..outputs.safetensors_meta import canonicalize_header, jsonable
from .lora_tensors import kohya_tensors, save_lora_file

__all__ = ["LORA_COMPONENTS", "canonicalize_safetensors", "make_kohya_lora", "make_peft_lora"]

#: Pipeline components that can carry a LoRA, in the fixed order random values are drawn.
LORA_COMPONENTS: tuple[str, ...] = ("unet", "transformer", "text_encoder", "text_encoder_2")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_TMP_ADAPTER = "lorarecipe_builtin_writer"

_KOHYA_UNET_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
_KOHYA_PROJ = ("proj_in", "proj_out")
_KOHYA_TE_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


def canonicalize_safetensors(path: Path) -> None:
    """Canonical header bytes (see :func:`lorarecipe.safetensors_meta.canonicalize_header`)."""
    canonicalize_header(Path(path))


def _components(pipe: DiffusionPipeline, text_encoders: bool) -> list[tuple[str, torch.nn.Module]]:
    """The pipeline's LoRA-loadable models that are present, in :data:`LORA_COMPONENTS` order."""
    loadable = set(getattr(pipe, "_lora_loadable_modules", LORA_COMPONENTS))
    found = []
    for name in LORA_COMPONENTS:
        model = getattr(pipe, name, None)
        if model is None or name not in loadable:
            continue
        if name in _TEXT_ENCODERS and not text_encoders:
            continue
        found.append((name, model))
    return found


def _active_adapters(model: torch.nn.Module) -> list[str]:
    """Adapters active on ``model`` before we touch it ([] when it has none)."""
    if not getattr(model, "peft_config", None):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            return list(module.active_adapters)
    return []


def _remove_adapter(model: torch.nn.Module, name: str, previously_active: list[str]) -> None:
    """Take adapter ``name`` out of ``model`` again (original modules back when it was the only one)."""
    peft_config: dict[str, Any] = getattr(model, "peft_config", {})
    if set(peft_config) == {name}:
        from diffusers.utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(model)
        del model.peft_config
        model._hf_peft_config_loaded = False
        return
    if hasattr(model, "delete_adapters"):  # diffusers ModelMixin
        model.delete_adapters(name)
    else:  # transformers PreTrainedModel
        model.delete_adapter(name)
    if previously_active:
        model.set_adapter(previously_active)


def _fill_lora_params(model: torch.nn.Module, adapter: str, generator: torch.Generator, scale: float) -> None:
    """Overwrite every lora_A/lora_B weight of ``adapter`` with ``randn * scale`` (in module order)."""
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if f".lora_A.{adapter}." in pname or f".lora_B.{adapter}." in pname:
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * scale
                param.copy_(values.to(param.dtype))


def make_peft_lora(
    pipe: DiffusionPipeline,
    path: Path,
    *,
    rank: int,
    alpha: float,
    seed: int,
    targets: Sequence[str] | str = ("to_q", "to_k", "to_v", "to_out.0"),
    te_targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "out_proj"),
    text_encoders: bool = True,
    scale: float = 0.2,
) -> Path:
    """Pipeline + rank/alpha/seed -> ``path``, a diffusers/PEFT-layout LoRA file with alpha in its metadata.

    Adds a peft adapter (``init_lora_weights=False``) to the denoiser and, when ``text_encoders``, to every
    text encoder; fills it with seeded ``randn * scale``; saves it with ``type(pipe).save_lora_weights``;
    then removes the adapter so ``pipe`` is unchanged. ``targets``: module name suffixes, or one regular
    expression (PEFT's full-match form). Returns ``path``.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, Any] = {}
    restore: list[tuple[torch.nn.Module, list[str]]] = []
    with warnings.catch_warnings():
        # our temporary adapter next to the caller's ones is intended; peft's warnings about it are noise
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        warnings.filterwarnings("ignore", message=f"Adapter {_TMP_ADAPTER} was active")
        try:
            for comp, model in _components(pipe, text_encoders):
                comp_targets = te_targets if comp in _TEXT_ENCODERS else targets
                wanted = comp_targets if isinstance(comp_targets, str) else list(comp_targets)
                config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=wanted, init_lora_weights=False)
                restore.append((model, _active_adapters(model)))
                model.add_adapter(config, adapter_name=_TMP_ADAPTER)
                _fill_lora_params(model, _TMP_ADAPTER, generator, scale)
                state = get_peft_model_state_dict(model, adapter_name=_TMP_ADAPTER)
                layers[f"{comp}_lora_layers"] = {k: v.detach().clone().contiguous() for k, v in state.items()}
                layers[f"{comp}_lora_adapter_metadata"] = jsonable(config.to_dict())
            path.parent.mkdir(parents=True, exist_ok=True)
            type(pipe).save_lora_weights(str(path.parent), weight_name=path.name, **layers)
            canonicalize_safetensors(path)
        finally:
            for model, active in reversed(restore):
                if _TMP_ADAPTER in getattr(model, "peft_config", {}):
                    _remove_adapter(model, _TMP_ADAPTER, active)
    return path


def _kohya_targets(model: torch.nn.Module, suffixes: Sequence[str], proj: bool) -> Iterator[tuple[str, Any]]:
    """(module name, module) for every Linear/1×1-Conv2d target of ``model``, in module order."""
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (proj and leaf in _KOHYA_PROJ) or any(name == s or name.endswith("." + s) for s in suffixes):
            if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1):
                continue
            yield name, module


def kohya_module_names(
    pipe: DiffusionPipeline, *, include_conv_proj: bool = True, text_encoders: bool = True
) -> dict[str, tuple[str, str]]:
    """kohya prefix -> (component, module name) for every module :func:`make_kohya_lora` targets.

    UNet: ``lora_unet_`` + module path with ``.`` → ``_``. Text encoders always carry the real-world
    ``text_model_`` segment exactly once: transformers 5 ``CLIPTextModel`` has no ``text_model`` module
    (diffusers strips the segment on load) while ``CLIPTextModelWithProjection`` still has one.
    ``lora_te_`` for a single encoder (SD1), ``lora_te1_`` / ``lora_te2_`` for two (SDXL).
    """
    comps = _components(pipe, text_encoders)
    two_te = getattr(pipe, "text_encoder_2", None) is not None
    te_prefix = {"text_encoder": "lora_te1_" if two_te else "lora_te_", "text_encoder_2": "lora_te2_"}
    names: dict[str, tuple[str, str]] = {}
    for comp, model in comps:
        if comp in _TEXT_ENCODERS:
            for mod_name, _ in _kohya_targets(model, _KOHYA_TE_SUFFIXES, proj=False):
                kohya = "text_model." + mod_name.removeprefix("text_model.")
                names[te_prefix[comp] + kohya.replace(".", "_")] = (comp, mod_name)
        elif comp == "unet":
            for mod_name, _ in _kohya_targets(model, _KOHYA_UNET_SUFFIXES, proj=include_conv_proj):
                names["lora_unet_" + mod_name.replace(".", "_")] = (comp, mod_name)
        else:
            raise ValueError(f"kohya layout is only written for UNet pipelines, not {comp!r}")
    return names


def make_kohya_lora(
    pipe: DiffusionPipeline,
    path: Path,
    *,
    rank: int,
    alpha: float,
    seed: int,
    include_conv_proj: bool = True,
    text_encoders: bool = True,
    scale: float = 0.2,
) -> Path:
    """Pipeline + rank/alpha/seed -> ``path``, a kohya-layout LoRA file written with ``save_file``.

    Targets attention q/k/v/out, the feed-forward linears and (``include_conv_proj``) ``proj_in`` /
    ``proj_out`` — 1×1 convolutions in SD1, stored as ``[r, in, 1, 1]`` / ``[out, r, 1, 1]`` — plus the text
    encoders' q/k/v/out_proj and mlp fc1/fc2. ``.alpha`` is a 0-dim float32 tensor. ``pipe`` is only read.
    """
    path = Path(path)
    generator = torch.Generator().manual_seed(seed)
    models = dict(_components(pipe, text_encoders))
    tensors: dict[str, torch.Tensor] = {}
    for prefix, (comp, mod_name) in kohya_module_names(
        pipe, include_conv_proj=include_conv_proj, text_encoders=text_encoders
    ).items():
        module = models[comp].get_submodule(mod_name)
        if isinstance(module, torch.nn.Conv2d):
            down_shape: tuple[int, ...] = (rank, module.in_channels, 1, 1)
            up_shape: tuple[int, ...] = (module.out_channels, rank, 1, 1)
        else:
            down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
        down = torch.randn(down_shape, generator=generator) * scale
        up = torch.randn(up_shape, generator=generator) * scale
        tensors.update(kohya_tensors(prefix, down, up, alpha))
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
    }
    return save_lora_file(tensors, path, metadata)
