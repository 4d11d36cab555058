"""Two builds of the native module against each other in one process: their kernel calls
alternate (which goes first swaps every call), so a noisy machine slows both alike. On the 2-vCPU
VMs the same build timed in separate processes moved by up to 1.5x; two copies of one build
compared here agree within 1 %.

    cp python/hlora/_native.abi3.so /tmp/before.so   # then change the Rust code and rebuild
    python scripts/dev/build_ab.py --before /tmp/before.so --op penalty --shape 192x576 [--threads 1]
        [--omega-dtype bfloat16] [--cold]

`--cold` evicts the caches before every call (an 8 MiB copy, far larger than this VM's 2 MiB of L2
per core), as the reference's temporaries do in `hlora bench` and a model's forward/backward does
between a training step's kernel calls: ω/Ω then come from L3 or memory.

`--after` defaults to the installed build. Both builds' results are compared first (relative
differences printed: a change that should be bit-for-bit the same shows 0); the 10th percentile
and median of each build's calls follow.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence

import torch

import hlora  # noqa: F401  (torch and the version check first, as `import hlora` does)
from hlora._loader import NATIVE


def load_build(path: str, name: str) -> ModuleType:
    """The extension at `path` as a module of its own (`PyInit__native` is looked up by the file's
    last name component, so two builds load side by side under different package names)."""
    if not Path(path).is_file():
        raise SystemExit(f"--before/--after: no file {path}")
    spec = importlib.util.spec_from_file_location(f"{name}._native", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: Ω's storage dtypes the penalty reads (the ω update and finalization take float32 here).
OMEGA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def calls(native: ModuleType, op: str, rows: int, cols: int,
          omega_dtype: torch.dtype = torch.float32) -> Callable[[], object]:
    """One kernel call of `op` at (rows, cols), r = 8, on fixed random inputs (never zeros); Ω
    stored as `omega_dtype` (the penalty's ops only)."""
    g = torch.Generator().manual_seed(0)
    om = torch.rand(rows, cols, generator=g)
    a, b = torch.randn(8, cols, generator=g), torch.randn(rows, 8, generator=g)
    a0, b0 = a * 0.9, b * 0.9
    ga, gb = torch.randn(8, cols, generator=g), torch.randn(rows, 8, generator=g)
    stored = om.to(omega_dtype)
    return {
        "omega": lambda: native.accumulate_omega_(om, a0, b0, ga, gb, a, b, lr=1e-3, scaling=2.0) or om,
        "finalize": lambda: native.finalize_importance(om, a, b, scaling=2.0, xi=1e-3),
        "penalty": lambda: native.importance_penalty(stored, a, b, a0, b0, scaling=2.0, compute_grads=True),
        "value": lambda: native.importance_penalty(stored, a, b, a0, b0, scaling=2.0, compute_grads=False),
    }[op]


def _tensors(result: object) -> List[torch.Tensor]:
    items = result if isinstance(result, (tuple, list)) else [result]
    return [t for t in items if isinstance(t, torch.Tensor)]


def relative_differences(before: object, after: object) -> List[float]:
    """max |after − before| / max |before| per result tensor."""
    return [float((y.double() - x.double()).abs().max() / x.double().abs().max().clamp_min(1e-300))
            for x, y in zip(_tensors(before), _tensors(after))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="path of the build to compare against")
    parser.add_argument("--after", default=None, help="path of the other build (default: the installed one)")
    parser.add_argument("--op", choices=["omega", "finalize", "penalty", "value"], default="penalty")
    parser.add_argument("--shape", default="192x576")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--omega-dtype", choices=list(OMEGA_DTYPES), default="float32",
                        help="Ω's storage for --op penalty|value")
    parser.add_argument("--cold", action="store_true", help="evict the caches before every call")
    args = parser.parse_args(argv)
    if args.omega_dtype != "float32" and args.op not in ("penalty", "value"):
        parser.error("--omega-dtype: only the penalty reads a bfloat16/float16 Ω")
    if NATIVE is None and args.after is None:
        raise SystemExit("the native module is not installed: pass --after")
    rows, cols = (int(x) for x in args.shape.split("x"))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        _compare(args, rows, cols)
    finally:
        torch.set_num_threads(threads_before)  # a caller in the same process (a test) keeps its own
    return 0


def _evictor() -> Callable[[], object]:
    """A copy through 2 × 8 MiB: what a call finds in L1/L2 afterwards is only what it brings."""
    src, dst = torch.rand(1 << 21), torch.empty(1 << 21)
    return lambda: dst.copy_(src)


def _compare(args: argparse.Namespace, rows: int, cols: int) -> None:
    builds = {"before": load_build(args.before, "hlora_ab_before"),
              "after": load_build(args.after or NATIVE.__file__, "hlora_ab_after")}
    # The ω update writes into its ω: each build gets inputs of its own.
    fns = {name: calls(native, args.op, rows, cols, OMEGA_DTYPES[args.omega_dtype])
           for name, native in builds.items()}
    diffs = relative_differences(fns["before"](), fns["after"]())
    cold = " cold" if args.cold else ""
    print(f"{args.op} {rows}x{cols} threads={args.threads}{cold} relative differences after vs before: "
          + " ".join(f"{d:.2e}" for d in diffs))
    times: Dict[str, List[float]] = {name: [] for name in fns}
    order = list(fns)
    evict = _evictor() if args.cold else (lambda: None)
    for i in range(args.calls):
        for name in order if i % 2 else order[::-1]:
            evict()
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    for name, t in times.items():
        t.sort()
        print(f"{args.op} {rows}x{cols} threads={args.threads} {name:6s} p10 {t[len(t) // 10] * 1e6:8.1f} µs  "
              f"median {statistics.median(t) * 1e6:8.1f} µs")


if __name__ == "__main__":
    raise SystemExit(main())
