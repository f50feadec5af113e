"""Warm base pipelines: a base model loaded once and reused by every build of a batch that needs it.

LoadBase step + resolved base + device -> a diffusers pipeline in exactly the state a fresh load
gives. Loading (and, for the first build of a process, importing diffusers) is most of a small
build's time, so a batch groups its builds by base and each worker keeps its last base warm.

Before a reused pipeline is handed out it is made pristine again, never by arithmetic:

- LoRA layers are removed (``unload_lora_weights``), and every attribute that diffusers, PEFT or a
  pipeline call added to the pipeline or to a model since the load is deleted;
- the module tree, every parameter and buffer (name, shape, dtype, device) and every hook must equal
  the fresh load's, else the entry is dropped and the base loaded again (a cast to another dtype, a
  hook some library left);
- every tensor is copied back in place from a pristine copy taken right after the load
  (``tensor.copy_(pristine)``: never ``unfuse_lora``, which drifts, and never a new ``Parameter``,
  so a compiled denoiser stays valid), and every component that is not a torch module (scheduler,
  tokenizers, feature extractors) is a fresh copy of the loaded one: a fast tokenizer keeps the last
  call's padding and truncation and writes them into a saved ``tokenizer.json`` (``processors``).

The pristine copy lives in host memory (the size of the base's weights). ``keep=False`` (one build
alone) keeps nothing and costs nothing. One base at a time: a new base evicts the old one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...plan import LoadBase

__all__ = ["BaseKey", "WarmPipelines", "base_key", "processors", "restore_processors"]

BaseKey = tuple[Any, ...]


def base_key(step: LoadBase, path: Path, config: Path | None, device: str, dtype: str) -> BaseKey:
    """What makes two loads of a base the same pipeline: source, resolved files, dtype, variant, device."""
    source = step.source
    return (
        source.kind,
        source.ref,
        source.revision,
        str(path),
        str(config) if config else None,
        step.family,
        dtype,
        step.variant,
        step.single_file,
        device,
    )


def _models(pipe: Any) -> Iterator[tuple[str, Any]]:
    import torch

    for name, component in sorted(pipe.components.items()):
        if isinstance(component, torch.nn.Module):
            yield name, component


def _tensors(pipe: Any) -> Iterator[tuple[str, Any]]:
    for name, model in _models(pipe):
        for key, param in model.named_parameters(remove_duplicate=False):
            yield f"{name}.{key}", param
        for key, buffer in model.named_buffers(remove_duplicate=False):
            yield f"{name}.{key}", buffer


def _attributes(pipe: Any) -> dict[str, frozenset[str]]:
    """The attribute names of the pipeline and of every module of its models."""
    names = {"": frozenset(vars(pipe))}
    for name, model in _models(pipe):
        for key, module in model.named_modules():
            names[f"{name}:{key}"] = frozenset(vars(module))
    return names


def signature(pipe: Any) -> tuple[Any, ...]:
    """The pipeline's structure: modules (class, hooks), tensors (shape, dtype, device), scheduler class."""
    modules = []
    for name, model in _models(pipe):
        for key, module in model.named_modules():
            hooks = (len(module._forward_hooks), len(module._forward_pre_hooks), len(module._backward_hooks))
            modules.append((name, key, type(module).__qualname__, hooks))
    tensors = [(k, tuple(t.shape), str(t.dtype), str(t.device)) for k, t in _tensors(pipe)]
    return (tuple(modules), tuple(tensors), type(getattr(pipe, "scheduler", None)).__qualname__)


def processors(pipe: Any) -> dict[str, Any]:
    """Copies of the pipeline's components that are not torch modules (scheduler, tokenizers, feature
    extractors), as they are now: their runtime state changes with every call."""
    import torch

    return {
        name: copy.deepcopy(component)
        for name, component in pipe.components.items()
        if component is not None and not isinstance(component, torch.nn.Module)
    }


def restore_processors(pipe: Any, saved: dict[str, Any]) -> None:
    """Put fresh copies of ``saved`` (``processors``) back into the pipeline (the pipeline's config
    keeps the same library and class entries)."""
    for name, component in saved.items():
        setattr(pipe, name, copy.deepcopy(component))


def _has_lora(pipe: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for _, model in _models(pipe) for m in model.modules())


@dataclass
class _Entry:
    key: BaseKey
    pipe: Any
    dtype: str
    pristine: dict[str, Any]  # tensor name -> host copy
    attributes: dict[str, frozenset[str]]
    signature: tuple[Any, ...]
    processors: dict[str, Any]  # scheduler, tokenizers, …: copies as loaded
    compiled: dict[str, Any] = field(default_factory=dict)  # compile mode -> CompiledDenoiser


class WarmPipelines:
    """A worker's pipeline cache (one base at a time) and its grid compile settings.

    ``compile``: the mode of grids whose recipe does not say (``none`` or ``regional``);
    ``compile_backend``: torch.compile's backend (tests pass a counting backend).
    """

    def __init__(
        self, *, keep: bool = True, compile: str = "none", compile_backend: Any = "inductor"
    ) -> None:
        self.keep = keep
        self.compile = compile
        self.compile_backend = compile_backend
        self.loads = 0  # pipelines loaded by this worker
        self.reuses = 0  # builds served by a warm pipeline
        self.reloads = 0  # warm pipelines dropped because cleaning could not prove them pristine
        self._entry: _Entry | None = None
        self._loose: dict[str, Any] = {}  # compiled copies for a pipeline that is not kept
        self._loose_pipe: Any = None

    def acquire(self, step: LoadBase, path: Path, config: Path | None, device: str) -> tuple[Any, str]:
        """A pristine pipeline for this base: the warm one made pristine again, else a fresh load;
        returns (pipeline, dtype name used)."""
        from .load import load_dtype, load_pipeline

        key = base_key(step, path, config, device, load_dtype(step, path))
        entry = self._entry
        if entry is not None and entry.key == key:
            if self._restore(entry):
                self.reuses += 1
                return entry.pipe, entry.dtype
            self.reloads += 1
        self.discard()
        pipe, dtype = load_pipeline(step, path, config, device)
        self.loads += 1
        if self.keep:
            self._entry = self._remember(key, pipe, dtype)
        return pipe, dtype

    def compiled_denoiser(self, pipe: Any, mode: str) -> Any:
        """The regionally compiled render copy of ``pipe``'s denoiser (pristine weights): made and
        compiled once per warm base, a new one for a pipeline that is not kept."""
        from .compiled import CompiledDenoiser

        entry = self._entry
        made = entry.compiled if entry is not None and entry.pipe is pipe else self._loose
        if self._loose_pipe is not pipe and made is self._loose:
            self._loose.clear()
            self._loose_pipe = pipe
        if mode not in made:
            made[mode] = CompiledDenoiser(pipe, mode, self.compile_backend)
        return made[mode]

    def compile_key(self, mode: str) -> str | None:
        """What a grid's cell keys record of how it renders: None for eager, else the mode and the
        backend (compiled pixels may differ from eager ones, and between backends, by rounding)."""
        if mode == "none":
            return None
        backend = self.compile_backend
        return f"{mode}:{backend if isinstance(backend, str) else type(backend).__qualname__}"

    def discard(self) -> None:
        """Forget the warm pipeline (after a failed build, or to free its memory)."""
        self._entry = None
        self._loose.clear()
        self._loose_pipe = None

    # -- pristine state ---------------------------------------------------------------------------
    @staticmethod
    def _remember(key: BaseKey, pipe: Any, dtype: str) -> _Entry:
        import torch

        with torch.no_grad():
            pristine = {k: t.detach().to("cpu", copy=True) for k, t in _tensors(pipe)}
        return _Entry(key, pipe, dtype, pristine, _attributes(pipe), signature(pipe), processors(pipe))

    @staticmethod
    def _restore(entry: _Entry) -> bool:
        """Make the entry's pipeline pristine; False when that cannot be proven (then reload)."""
        import torch

        pipe = entry.pipe
        if _has_lora(pipe):
            pipe.unload_lora_weights()
        if _has_lora(pipe) or signature(pipe) != entry.signature:
            return False
        _drop_added_attributes(pipe, entry.attributes)
        with torch.no_grad():
            for key, tensor in _tensors(pipe):
                tensor.copy_(entry.pristine[key])
        restore_processors(pipe, entry.processors)
        return True


def _drop_added_attributes(pipe: Any, pristine: dict[str, frozenset[str]]) -> None:
    """Delete what diffusers/PEFT/a call added since the load (``_merged_adapters``, ``lora_scale``,
    ``_hf_peft_config_loaded``, per-call ``_guidance_scale``…): a fresh load has none of them."""
    for extra in set(vars(pipe)) - pristine[""]:
        del pipe.__dict__[extra]
    for name, model in _models(pipe):
        for key, module in model.named_modules():
            for extra in set(vars(module)) - pristine[f"{name}:{key}"]:
                del module.__dict__[extra]
