"""Run the lorarecipe CLI in a fresh Python process and measure it: exit code, output, peak RSS, CPU.

The child measures itself after ``main`` returns (peak RSS from ``/proc/self/status`` ``VmHWM``, CPU
from ``getrusage``) and writes the numbers to a file: the peak is that of this one command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_CHILD = """
import json, re, resource, sys
from lorarecipe.cli import main
code = main(sys.argv[2:])
usage = resource.getrusage(resource.RUSAGE_SELF)
try:  # this process's own peak (ru_maxrss keeps the forking parent's peak across exec on Linux)
    with open("/proc/self/status") as status:
        rss_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1))
except OSError:
    rss_kb = usage.ru_maxrss
with open(sys.argv[1], "w") as handle:
    json.dump({"code": code, "rss_kb": rss_kb, "cpu": usage.ru_utime + usage.ru_stime}, handle)
"""


@dataclass(frozen=True)
class Measured:
    code: int
    output: str
    rss_mb: float
    cpu_seconds: float
    wall_seconds: float


def measure_cli(*argv: str, folder: Path, timeout: float = 120) -> Measured:
    """``lorarecipe ARGV`` in a subprocess (cwd ``folder``) -> exit code, stdout+stderr, peak RSS, CPU."""
    report = folder / "measure.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(report), *argv],
        capture_output=True,
        text=True,
        cwd=folder,
        env=env,
        timeout=timeout,
        check=False,
    )
    wall = time.perf_counter() - started
    numbers = json.loads(report.read_text())
    return Measured(
        numbers["code"], done.stdout + done.stderr, numbers["rss_kb"] / 1024, numbers["cpu"], wall
    )
