"""Which worker built what: host, process and (under Ray) actor and node, for the manifest.

-> ``{"hostname", "pid", "ray_actor_id", "ray_node_id"}``, plus how the build got its pipeline
(loaded or reused warm). Recorded in ``manifest.json`` under ``worker`` and, per output, as a short
id; it says where a file came from and is left out of every determinism comparison (it differs
between any two runs). Never imports ray: the ids are read only when ray is already running here.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

__all__ = ["worker_identity", "worker_label"]


def _ray_ids() -> tuple[str | None, str | None]:
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None, None
    try:
        context = ray.get_runtime_context()
        return context.get_actor_id(), context.get_node_id()
    except Exception:  # not inside a Ray worker, or an older API: no ids rather than no build
        return None, None


def worker_identity() -> dict[str, Any]:
    """This process as a worker: hostname, pid, Ray actor and node ids (None outside Ray actors)."""
    actor, node = _ray_ids()
    return {"hostname": socket.gethostname(), "pid": os.getpid(), "ray_actor_id": actor, "ray_node_id": node}


def worker_label(identity: dict[str, Any]) -> str:
    """``host/pid`` or ``host/pid/actor`` (the actor id shortened to 12 characters)."""
    label = f"{identity['hostname']}/{identity['pid']}"
    return label + (f"/{identity['ray_actor_id'][:12]}" if identity.get("ray_actor_id") else "")
