"""Time per `run_tests` call in the RL code sandbox: what one code reward costs.

A correct solution and a HumanEval-style `check` calling it `--calls` times; the median of `--runs` calls
after one warm-up, with the isolation that ran them.

    python bench/sandbox_run_tests.py --runs 20 --calls 50
"""

from __future__ import annotations

import argparse
import statistics
import time

from afm.rl.sandbox import isolation, run_tests

SOLUTION = "def add(a, b):\n    return a + b\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--calls", type=int, default=50, help="calls of the solution's function per test run")
    args = ap.parse_args()
    tests = f"def check(candidate):\n    for i in range({args.calls}):\n        assert candidate(i, 1) == i + 1\n"
    if not run_tests(SOLUTION, tests, "add").passed:
        raise SystemExit(f"the sandbox cannot run tests here: {isolation()}")
    seconds = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        run_tests(SOLUTION, tests, "add")
        seconds.append(time.perf_counter() - t0)
    print(f"{isolation().split()[0]}: median {statistics.median(seconds) * 1e3:.0f} ms per run_tests "
          f"({args.calls} calls, {args.runs} runs)")


if __name__ == "__main__":
    main()
