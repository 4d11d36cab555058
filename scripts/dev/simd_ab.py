"""The SIMD variants of one build against each other: native kernel calls timed in processes
pinned to each variant with HLORA_SIMD, interleaved, so a noisy machine slows them alike.

    python scripts/dev/simd_ab.py --op omega --shape 192x576 [--rounds 6] [--threads 1]

Each process reports the 2nd percentile of its calls; the minimum and median over the rounds are
printed per variant (the minimum is the figure least disturbed by other load on the machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

SCRIPTS = str(Path(__file__).resolve().parent)

# The calls are build_ab's (same inputs and ops); scripts/ is put on the child's path for it.
CHILD = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[6])
from build_ab import calls
from hlora._loader import NATIVE
from hlora import _native
op, rows, cols, n_calls, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
f = calls(NATIVE, op, rows, cols)
times = []
for _ in range(n_calls):
    t = time.perf_counter()
    f()
    times.append(time.perf_counter() - t)
times.sort()
print(_native.simd_level(), times[len(times) // 50] * 1e6)
"""


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=["omega", "finalize", "penalty", "value"], default="omega")
    parser.add_argument("--shape", default="192x576")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="avx2,avx512", help="HLORA_SIMD values, comma-separated")
    args = parser.parse_args(argv)
    rows, cols = (int(x) for x in args.shape.split("x"))
    results: Dict[str, List[float]] = {v: [] for v in args.variants.split(",")}
    for _ in range(args.rounds):
        for variant in results:
            out = subprocess.run([sys.executable, "-c", CHILD, args.op, str(rows), str(cols), str(args.calls),
                                  str(args.threads), SCRIPTS], env={**os.environ, "HLORA_SIMD": variant},
                                 capture_output=True, text=True, check=True).stdout.split()
            if out[0] != variant:  # a cap above what the CPU has runs the best it has instead
                raise SystemExit(f"HLORA_SIMD={variant} ran {out[0]}: this CPU cannot run that variant")
            results[variant].append(float(out[1]))
    for variant, us in results.items():
        print(f"{args.op} {rows}x{cols} threads={args.threads} {variant:7s} min {min(us):8.1f} µs  "
              f"median {statistics.median(us):8.1f} µs  ({', '.join(f'{x:.0f}' for x in us)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
