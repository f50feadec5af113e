"""How long does `lorarecipe validate recipes/` take, end to end (a fresh process each time)?

    python benchmarks/validate_speed.py [--runs 7] [PATH]

Prints each wall time and the median; the target is < 0.5 s on a 2-core CPU machine. Also checks
that neither torch, diffusers, peft nor transformers got imported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = (
    "import sys, runpy; sys.argv = ['lorarecipe', 'validate', {path!r}]\n"
    "from lorarecipe.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "heavy = [m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules]\n"
    "assert not heavy, heavy\n"
    "sys.exit(code)\n"
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", nargs="?", default=str(REPO / "recipes"))
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", CHECK.format(path=args.path)], capture_output=True, text=True
        )
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return 1
    print("runs (s):", " ".join(f"{t:.3f}" for t in times))
    median = statistics.median(times)
    print(f"median wall time of `lorarecipe validate {args.path}`: {median:.3f} s (target < 0.5 s)")
    return 0 if median < 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
