"""PEFT ``add_weighted_adapter`` on a diffusers pipeline, with the traps the guides leave to users.

MergeAdapters step + pipeline -> a new adapter in every component that has any of its inputs.
Handled here, not passed on: weights set by ``set_adapters`` multiply into the merge (reset to 1.0
first); an existing name makes PEFT silently do nothing (refused); DARE draws from torch's global
RNG (seeded from the recipe before each component); merges run on one thread (an SVD's result
depends on the thread count: a merge must not change with the machine); an adapter absent from a
component (a UNet-only LoRA in a text-encoder merge) is left out of that component's merge instead
of failing — unless only one adapter is left and PEFT's lone-adapter ``linear`` is not the method's
result (the compiler refuses that from headers; refused here too, never merged silently);
``svd_driver`` only on CUDA.
"""

from __future__ import annotations

from typing import Any

from ...errors import BuildError
from ...plan import MergeAdapters
from ...recipe.vocabulary import lone_adapter_merge_is_exact

__all__ = ["lora_components", "merge_adapters"]


def as_lora_model(model: Any) -> Any:
    """A PEFT ``LoraModel`` view of an already-injected model: no re-injection, no copy.

    diffusers injects adapters with ``inject_adapter_in_model`` and keeps ``peft_config`` on the
    model, but has no ``add_weighted_adapter``; wrapping with ``LoraModel(model, …)`` would
    re-initialise the adapter's weights. This view shares ``peft_config``, so the merged adapter is
    visible to ``set_adapters`` at once. Relies on peft 0.21's ``BaseTuner`` attributes (pinned;
    ``tests/test_runner_outputs.py`` checks a merge against the deltas PEFT's own layers compute).
    """
    import torch
    from peft.tuners.lora import LoraModel

    view = LoraModel.__new__(LoraModel)
    torch.nn.Module.__init__(view)
    view.model = model
    view.peft_config = model.peft_config
    view.targeted_module_names = []
    view.targeted_parameter_names = []
    view.active_adapter = next(iter(model.peft_config))
    return view


def lora_components(pipe: Any) -> list[str]:
    """The pipeline's LoRA-loadable components that exist and carry adapters."""
    names = []
    for comp in getattr(pipe, "_lora_loadable_modules", []):
        model = getattr(pipe, comp, None)
        if model is not None and getattr(model, "peft_config", None):
            names.append(comp)
    return names


def reset_weights(pipe: Any) -> None:
    """Every adapter's set_adapters weight back to 1.0 (scaling = alpha / r)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for comp in lora_components(pipe):
        for module in getattr(pipe, comp).modules():
            if isinstance(module, BaseTunerLayer):
                for adapter in list(module.scaling):
                    module.set_scale(adapter, 1.0)


def svd_driver_here(model: Any, step: MergeAdapters) -> str:
    """The merge's ``svd_driver``, refused where torch cannot use it: ``torch.linalg.svd(driver=…)``
    only works on CUDA tensors (cuSOLVER); on CPU and MPS it raises for every driver."""
    device = next(iter(model.parameters())).device
    if device.type != "cuda":
        raise BuildError(
            f"merge {step.name!r}: svd_driver {step.svd_driver!r} only works on CUDA (cuSOLVER), "
            f"but this merge runs on {device.type}; remove svd_driver or build with --device cuda"
        )
    assert step.svd_driver is not None
    return step.svd_driver


def _uniform_targets(model: Any, names: list[str]) -> None:
    """PEFT refuses to merge adapters whose ``target_modules`` mix a regular expression and a list; a
    regular expression is replaced by the set of module names it matched (the same modules, exactly)."""
    from .adapters import injected_modules

    configs = [model.peft_config[n] for n in names]
    if len({isinstance(c.target_modules, str) for c in configs}) < 2:
        return
    for name, config in zip(names, configs, strict=True):
        if isinstance(config.target_modules, str):
            config.target_modules = injected_modules(model, name)


def merge_adapters(pipe: Any, step: MergeAdapters) -> list[str]:
    """Run one merge in every component that has at least one input; returns those components."""
    import torch

    components = [c for c in lora_components(pipe) if step.components is None or c in step.components]
    done = []
    for comp in components:
        model = getattr(pipe, comp)
        if step.name in model.peft_config:
            raise BuildError(
                f"an adapter named {step.name!r} already exists in {comp}; PEFT would silently skip the merge"
            )
        present = [(n, w) for n, w in zip(step.adapters, step.weights, strict=True) if n in model.peft_config]
        if not present:
            continue
        if len(present) == 1:
            config = model.peft_config[present[0][0]]
            rank = max([config.r, *config.rank_pattern.values()])
            if not lone_adapter_merge_is_exact(step.method, step.svd_rank, step.svd_clamp, rank):
                raise BuildError(
                    f"merge {step.name!r}: only {present[0][0]!r} has {comp} layers; PEFT would merge it "
                    f"alone with 'linear', ignoring method {step.method!r}",
                )
        reset_weights(pipe)
        _uniform_targets(model, [n for n, _ in present])
        torch.manual_seed(step.seed)
        view = as_lora_model(model)
        kwargs: dict[str, Any] = {
            "combination_type": step.method,
            "svd_full_matrices": step.svd_full_matrices,
        }
        if step.svd_rank is not None:
            kwargs["svd_rank"] = step.svd_rank
        if step.svd_clamp is not None:
            kwargs["svd_clamp"] = step.svd_clamp
        if step.density is not None:
            kwargs["density"] = step.density
        if step.majority_sign_method is not None:
            kwargs["majority_sign_method"] = step.majority_sign_method
        if step.svd_driver is not None:
            kwargs["svd_driver"] = svd_driver_here(model, step)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # LAPACK's SVD (and its GEMMs) round differently with other counts
        try:
            view.add_weighted_adapter(
                [n for n, _ in present], [float(w) for _, w in present], step.name, **kwargs
            )
        finally:
            torch.set_num_threads(threads)
        if step.name not in model.peft_config:
            raise BuildError(f"PEFT did not create the merged adapter {step.name!r} in {comp}")
        done.append(comp)
    if not done:
        raise BuildError(
            f"merge {step.name!r}: none of its adapters is loaded in the components "
            f"{', '.join(components) or '(none)'}"
        )
    return done
