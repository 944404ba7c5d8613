"""What ``import fastattn`` costs over ``import torch``, in fresh interpreters.

    python -m benchmarks.import_time            # 7 rounds, interleaved

Each round starts one interpreter that imports torch and one that imports fastattn (which
imports torch), in alternating order, so that a busy machine slows both alike; the medians
and their difference are printed. The goal: fastattn adds < 0.3 s on a quiet machine.
tests/test_import.py holds the property this relies on (no torch._dynamo, triton or
Transformers at import), which a timing could only hint at.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

STATEMENTS = {"torch": "import torch", "fastattn": "import fastattn"}


def time_import(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - start


def measure(rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for r in range(rounds):
        order = list(STATEMENTS) if r % 2 == 0 else list(reversed(STATEMENTS))
        for name in order:
            times[name].append(time_import(STATEMENTS[name]))
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.import_time", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    times = measure(args.rounds)
    torch_s, fastattn_s = (statistics.median(times[name]) for name in ("torch", "fastattn"))
    print(f"import torch     {torch_s:.2f} s (median of {args.rounds} fresh interpreters)")
    print(f"import fastattn  {fastattn_s:.2f} s")
    print(f"fastattn adds    {fastattn_s - torch_s:+.2f} s ({fastattn_s / torch_s:.2f}x import torch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
