"""hlora's CPU kernels alone, for tuning them: 10th-percentile and median times of the native calls
at the benchmark's shapes, back to back, after an idle pause (where a sleeping worker must wake) and
after a copy that flushes the caches (as a training step, or the benchmark's reference, does). The
penalty through `ops` (autograd Function, forward + backward) is timed beside the bare kernels, to
show what the Python/autograd round trip adds, warm and cold.

    python scripts/dev/kernel_timings.py [--threads 1] [--pause-ms 3] [--flush-mb 16] [--only 576x576]

Unlike `hlora bench` there is no reference in between, so neither torch's busy-waiting OpenMP
workers nor its temporaries disturb the kernels: compare two builds with this, run alternately.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

import hlora
from hlora.experiments import bench


def _times(fn: Callable[[], object], calls: int, pause_s: float,
           before: Callable[[], object] = lambda: None) -> List[float]:
    for _ in range(3):
        fn()
    out = []
    for _ in range(calls):
        before()
        if pause_s:
            deadline = time.perf_counter() + pause_s
            while time.perf_counter() < deadline:  # busy, so only the pool sleeps
                pass
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _kernels(x: Dict[str, torch.Tensor]) -> Dict[str, Callable[[], object]]:
    from hlora import _native, ops

    common = dict(scaling=4.0, scaling_ref=None)
    omega = x["omega"].clone()  # updated in place thousands of times: kept apart from the penalty's Ω
    return {
        "penalty fwd+bwd (ops)": bench._op_calls(ops, x)["penalty fwd+bwd"],
        "omega update": lambda: _native.accumulate_omega_(
            omega, x["a0"], x["b0"], x["ga"], x["gb"], x["a1"], x["b1"], lr=8e-4, scaling=4.0),
        "penalty + grads": lambda: _native.importance_penalty(
            x["omega"], x["a1"], x["b1"], x["a0"], x["b0"], compute_grads=True, **common),
        "penalty only": lambda: _native.importance_penalty(
            x["omega"], x["a1"], x["b1"], x["a0"], x["b0"], compute_grads=False, **common),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pause-ms", type=float, default=3.0, help="idle time before each call of the second pass")
    parser.add_argument("--flush-mb", type=float, default=16.0, help="bytes copied before each call of the third pass")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--calls", type=int, default=0, help="calls per cell (default: 200, 30 at LLaMA shapes)")
    parser.add_argument("--only", default=None, help="one shape, e.g. 192x576")
    args = parser.parse_args(argv)
    if hlora.backend() != "rust":
        parser.error("the native module is not loaded (hlora.backend() is not 'rust'): nothing to time")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        _print_table(args)
    finally:
        torch.set_num_threads(threads_before)  # a caller in the same process (a test) keeps its own
    return 0


def _print_table(args: argparse.Namespace) -> None:
    from hlora import _native

    print(f"threads={args.threads} on {_native.cpu_threading()} simd={_native.simd_level()} r={args.rank}; "
          "ms as p10 / median")
    print("| shape | kernel | back to back | after a pause | caches flushed |\n|---|---|---:|---:|---:|")
    flush_src = torch.rand(max(1, int(args.flush_mb * 2**20 / 4)))
    flush_dst = torch.empty_like(flush_src)
    # (idle seconds, what runs) before each timed call: back to back, after a pause, after a flush.
    passes = [(0.0, lambda: None), (args.pause_ms / 1e3, lambda: None), (0.0, lambda: flush_dst.copy_(flush_src))]
    for name, out, inn in bench.SHAPES:
        if args.only not in (None, f"{out}x{inn}"):
            continue
        calls = args.calls or (200 if out * inn < 1_000_000 else 30)
        kernels = _kernels(bench._inputs(out, inn, args.rank, torch.device("cpu")))
        for kernel, fn in kernels.items():
            cells = []
            for pause, before in passes:
                ts = sorted(_times(fn, calls, pause, before))
                cells.append(f"{ts[len(ts) // 10] * 1e3:.3f} / {statistics.median(ts) * 1e3:.3f}")
            print(f"| {name} ({out}x{inn}) | {kernel} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
