"""Run inside Ray worker processes (``worker_process_setup_hook``): kill one build's worker once.

With ``LORARECIPE_TEST_KILL_MARKER`` set, the first worker process that records the second output
of a build whose output folder ends with ``LORARECIPE_TEST_KILL_BUILD`` creates the marker file and
exits at once (``os._exit``: no cleanup, no exception, as a killed or OOM-killed process), leaving
a half-written build: its output lock held until the process is gone, some outputs done, a
manifest that lists only those. Later workers see the marker and build normally.
"""

from __future__ import annotations

import os
from typing import Any


def kill_once() -> None:
    marker = os.environ.get("LORARECIPE_TEST_KILL_MARKER")
    if not marker:
        return
    from lorarecipe.runner import journal

    record = journal.ManifestJournal.record
    seen: list[str] = []

    def record_then_die(self: Any, name: str, *args: Any, **kwargs: Any) -> None:
        record(self, name, *args, **kwargs)
        if str(self.out_root).endswith(os.environ["LORARECIPE_TEST_KILL_BUILD"]):
            seen.append(name)
            if len(seen) == 2 and not os.path.exists(marker):
                with open(marker, "w") as done:
                    done.write(str(os.getpid()))
                os._exit(1)

    journal.ManifestJournal.record = record_then_die  # type: ignore[method-assign]
