"""Test-wide setup: no network, ever; private Hugging Face and lorarecipe caches.

The environment variables are set at import time, before any test imports huggingface_hub or
diffusers (huggingface_hub reads them once, at import). Sockets are closed for the whole session,
so an accidental download fails loudly instead of hanging or passing by luck.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="lorarecipe-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["DIFFUSERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = str(_SESSION_TMP / "hf-home")
os.environ.pop("HF_HUB_CACHE", None)
os.environ.pop("HUGGINGFACE_HUB_CACHE", None)
# Built-in tiny models are built once per session (shared by all tests), unless a test overrides it.
os.environ.setdefault("LORARECIPE_CACHE", str(_SESSION_TMP / "lorarecipe-cache"))

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"


class NetworkBlocked(RuntimeError):
    pass


@pytest.fixture(autouse=True, scope="session")
def _no_network() -> Iterator[None]:
    real_connect = socket.socket.connect

    def refuse(self: socket.socket, address: object) -> None:
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)  # type: ignore[arg-type]
        raise NetworkBlocked(f"tests must not use the network (tried {address!r})")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect = real_connect  # type: ignore[method-assign]


@pytest.fixture
def realdata() -> Path:
    if not (REALDATA / "loras").is_dir():
        pytest.skip(f"real third-party files not available at {REALDATA} (see research/real-cases.md)")
    return REALDATA


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``realdata`` skip with a reason when the shared real files are absent."""
    if item.get_closest_marker("realdata") and not (REALDATA / "loras").is_dir():
        pytest.skip(f"real third-party files not available at {REALDATA} (see research/real-cases.md)")
    if item.get_closest_marker("gpu"):
        import torch

        if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
            pytest.skip("needs a CUDA or MPS device")


@pytest.fixture(scope="session")
def cold_batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The warm/Ray tests' batch of recipes and its cold reference: each build made alone in a fresh
    process (built once per session: both test modules compare against it)."""
    from tests.helpers.batch_builds import build_cold, write_batch

    root = tmp_path_factory.mktemp("batch")
    recipes = write_batch(root / "recipes")
    build_cold(recipes, root / "cold")
    return {"recipes": recipes, "cold": root / "cold"}
