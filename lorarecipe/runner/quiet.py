"""Silence the libraries' own logs and progress bars during a build.

diffusers/transformers/peft print LOAD REPORT tables, "missing keys" notes and tqdm bars that are
either noise (each adapter's keys are "missing" for the others) or checked more strictly by
lorarecipe itself (every LoRA tensor must be applied). Real failures still raise.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

__all__ = ["quiet_libraries"]


def quiet_libraries(*, load: bool = False) -> None:
    """Quiet the libraries already imported (all of them with ``load``, which imports diffusers and
    transformers: call it right before using them). Environment variables and ``logging`` levels
    set here also quiet a library imported later, so a build that never needs diffusers (a streaming
    fuse from cached factors) never pays for importing it."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("diffusers", "transformers", "peft", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for library in ("diffusers", "transformers"):
        if load or library in sys.modules:
            try:
                log = importlib.import_module(f"{library}.utils.logging")
            except ImportError:  # pragma: no cover
                continue
            log.set_verbosity_error()
            log.disable_progress_bar()
    if load or "huggingface_hub" in sys.modules:
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass
