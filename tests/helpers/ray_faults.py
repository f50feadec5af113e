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


def kill_shard_twice() -> None:
    """With ``LORARECIPE_TEST_SHARD_MARKER`` set, the worker process that starts the first grid shard of
    a build whose output folder ends with ``LORARECIPE_TEST_KILL_SHARD`` exits at once, twice (marker
    files ``<marker>-1`` and ``<marker>-2``): with ``--retries 1`` the shard is retried once, then
    given up, and the build must render its cells itself."""
    marker = os.environ.get("LORARECIPE_TEST_SHARD_MARKER")
    if not marker:
        return
    from lorarecipe.gitops import shards

    run_shard = shards.run_shard

    def die_then_run(shard: Any, *args: Any, **kwargs: Any) -> Any:
        if str(shard.job.out).endswith(os.environ["LORARECIPE_TEST_KILL_SHARD"]) and shard.number == 0:
            for attempt in (1, 2):
                if not os.path.exists(f"{marker}-{attempt}"):
                    with open(f"{marker}-{attempt}", "w") as done:
                        done.write(str(os.getpid()))
                    os._exit(1)
        return run_shard(shard, *args, **kwargs)

    shards.run_shard = die_then_run


def install() -> None:
    """Every fault above whose environment variables are set."""
    kill_once()
    kill_shard_twice()
