"""The streaming fuser's cache: each adapter's LoRA factors as diffusers and PEFT loaded them, so a
later fuse with the same inputs needs neither diffusers, transformers nor PEFT.

Plan + config folder + LoRA files -> a key per adapter (LoadAdapter: the file's sha256 and declared
format; MergeAdapters: the merge's parameters and its inputs' keys), both including the key of the
base's configuration (``model_index.json`` and each component's ``config.json``, the pipeline class)
and the versions of lorarecipe, diffusers, PEFT, transformers and torch. An entry is a safetensors
file of the float32 ``lora_A``/``lora_B`` of every module, in every component, with its alpha, rank,
rsLoRA flag and layer kind in the metadata (``<lorarecipe cache>/factors/``). The set_adapters
weights, ``lora_scale`` and the fused components are not part of the key: changing them re-fuses
from the cache. Also cached: the state-dict shapes and configs of the components (what a
single-file layout needs: ``Architecture``), keyed by the configuration.

Entries are written atomically and validated on read; an unreadable or inconsistent entry is a miss,
never an error. Nothing in an entry is executed or unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from ...errors import BuildError
from ...fs.atomic import atomic_file, atomic_write_text, cache_root
from ...fs.hashing import sha256_file, sha256_text
from ...fs.json_files import parse_json, read_json
from ...plan import FuseAdapters, LoadAdapter, MergeAdapters, Plan, canonical_json
from ..fuse_math import LayerKind, LoraFactor
from .skeleton import Architecture

__all__ = ["FORMAT", "FactorCache"]

FORMAT = 2  # 2: architectures list a tied weight once (T5 text encoders)
_META = "lorarecipe.factors"
_LIBRARIES = ("lorarecipe", "diffusers", "peft", "transformers", "torch")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def config_key(config_root: Path, pipeline_class: str | None) -> str:
    """sha256 of what decides how a LoRA maps onto the base: its configs, pipeline class, libraries."""
    doc: dict[str, Any] = {"format": FORMAT, "pipeline": pipeline_class}
    doc["versions"] = {name: _version(name) for name in _LIBRARIES}
    index_path = config_root / "model_index.json"
    index_text = index_path.read_text(encoding="utf-8")
    doc["model_index"] = index_text
    configs = {}
    for component in sorted(parse_json(index_text, str(index_path), expect=dict)):
        config = config_root / component / "config.json"
        if not component.startswith("_") and config.is_file():
            configs[component] = config.read_text(encoding="utf-8")
    doc["configs"] = configs
    return sha256_text(canonical_json(doc))


def _merge_payload(step: MergeAdapters) -> dict[str, Any]:
    return {k: v for k, v in step.payload().items() if k not in ("id", "inputs", "name", "adapters")}


class FactorCache:
    """The cache entries of one fuse: keys of the fused adapters, their factors, the architecture."""

    def __init__(
        self,
        plan: Plan,
        fuse: FuseAdapters,
        adapter_paths: Mapping[str, Path],
        config_root: Path,
        pipeline_class: str | None,
        root: Path | None = None,
    ) -> None:
        self.root = (root or cache_root()) / "factors"
        self.config = config_key(config_root, pipeline_class)
        loads = {s.name: s for s in plan.of_type(LoadAdapter)}
        merges = {s.name: s for s in plan.of_type(MergeAdapters)}
        keys: dict[str, str] = {}

        def key_of(name: str) -> str:
            if name not in keys:
                if name in merges:
                    step = merges[name]
                    doc = {"merge": _merge_payload(step), "inputs": [key_of(a) for a in step.adapters]}
                else:
                    if name not in adapter_paths or name not in loads:
                        raise BuildError(f"no file for adapter {name!r}")
                    doc = {"file": sha256_file(Path(adapter_paths[name])), "format": loads[name].format}
                    if loads[name].load_into:  # which experts the file's modules land in
                        doc["load_into"] = list(loads[name].load_into)
                keys[name] = sha256_text(canonical_json({**doc, "config": self.config}))
            return keys[name]

        self.keys = {name: key_of(name) for name in fuse.adapters}

    # ---------------------------------------------------------------------------------- factors

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, adapters: Iterable[str]) -> dict[str, dict[tuple[str, str], LoraFactor]] | None:
        """Every adapter's factors, or None when any entry is missing or unreadable."""
        out = {}
        for adapter in adapters:
            found = self._load_one(self._path(self.keys[adapter]))
            if found is None:
                return None
            out[adapter] = found
        return out

    def _load_one(self, path: Path) -> dict[tuple[str, str], LoraFactor] | None:
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                doc = parse_json((handle.metadata() or {})[_META], str(path), expect=dict)
                if doc.get("format") != FORMAT:
                    return None
                out = {}
                for index, (component, module, alpha, rank, rslora, kind) in enumerate(doc["modules"]):
                    a, b = handle.get_tensor(f"{index}.a"), handle.get_tensor(f"{index}.b")
                    if not _consistent(a, b, rank, kind):
                        return None
                    out[(str(component), str(module))] = LoraFactor(
                        a, b, alpha, int(rank), bool(rslora), LayerKind(kind)
                    )
                return out
        except Exception:
            return None

    def store(self, factors: Mapping[str, Mapping[tuple[str, str], LoraFactor]]) -> None:
        """Write each adapter's factors (best effort: an unwritable cache only costs speed)."""
        from safetensors.torch import save_file

        for adapter, found in factors.items():
            path = self._path(self.keys[adapter])
            modules, tensors = [], {}
            storages: set[int] = set()
            for index, ((component, module), f) in enumerate(sorted(found.items())):
                modules.append([component, module, f.alpha, f.r, f.rslora, f.kind])
                tensors[f"{index}.a"] = _own(f.a, storages)
                tensors[f"{index}.b"] = _own(f.b, storages)
            meta = {_META: json.dumps({"format": FORMAT, "modules": modules})}
            try:
                with atomic_file(path) as tmp:
                    save_file(tensors, str(tmp), metadata=meta)
            except Exception:  # a cache that cannot be written only costs speed (runs in a thread)
                continue

    # ----------------------------------------------------------------------------- architecture

    def _architecture_path(self, extra: tuple[str, ...]) -> Path:
        key = sha256_text(canonical_json([self.config, list(extra)]))
        return self.root / "architectures" / f"{key}.json"

    def load_architecture(self, extra: tuple[str, ...]) -> Architecture | None:
        try:
            doc = read_json(self._architecture_path(extra))
            shapes = {
                c: {k: tuple(int(n) for n in v) for k, v in t.items()} for c, t in doc["shapes"].items()
            }
            return Architecture(shapes, dict(doc["configs"]), dict(doc["libraries"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def store_architecture(self, extra: tuple[str, ...], arch: Architecture) -> None:
        doc = {"shapes": arch.shapes, "configs": arch.configs, "libraries": arch.libraries}
        try:
            atomic_write_text(
                self._architecture_path(extra), json.dumps(doc, sort_keys=True, default=_jsonable)
            )
        except (OSError, TypeError, ValueError):
            return


def _own(tensor: Any, storages: set[int]) -> Any:
    """A contiguous tensor with storage of its own among those saved together (save_file refuses
    non-contiguous tensors and tensors sharing memory; factors loaded by diffusers may share one
    ``down`` for q, k and v): copied only when it has to be, the cache must not double the memory."""
    out = tensor.contiguous()
    pointer = out.untyped_storage().data_ptr()
    if pointer in storages:
        out = out.clone()
        pointer = out.untyped_storage().data_ptr()
    storages.add(pointer)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def _consistent(a: Any, b: Any, rank: int, kind: str) -> bool:
    import torch

    known = {k.value for k in LayerKind}
    if kind not in known or a.dtype != torch.float32 or b.dtype != torch.float32:
        return False
    conv = kind != LayerKind.LINEAR.value
    if a.dim() != (4 if conv else 2) or b.dim() != a.dim():
        return False
    return int(a.shape[0]) == rank and int(b.shape[1]) == rank
