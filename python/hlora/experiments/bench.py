"""Benchmark: the fused kernels against the plain-PyTorch formulas of DESIGN §1.

Both sides get the same float32 inputs (the reference is the formula a user would write, no
float64 upcast). The two are timed alternately, call by call, so a noisy machine slows both
alike; medians are reported, with the ratio reference/hlora and the bandwidth of the one pass
over ω/Ω the fused kernel makes, against a measured memory copy.

For the penalty, a third call is timed the same way, each after a reference call: an
``autograd.Function`` that does no work (its forward returns a value computed beforehand, its
backward scales gradients computed beforehand). That is the autograd round trip any
differentiable penalty pays on top of its kernel, so reference / no-work is the most any of them
could gain here (the "ceiling" printed below the table).

    python -m hlora.experiments.bench [--threads 2] [--repeats 21] [--device cpu|cuda] [--json out.json]

A last table times hlora's calls under each provider the build has (tch, view), alternately.

The reference's CPU times depend on glibc's allocator state (torch does not cache CPU memory, so
its large temporaries may be mapped and page-faulted in on every call); run with
MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=536870912 for the reference at its best.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import hlora
from hlora import ops, reference
from hlora._io import write_json_atomic
from hlora.experiments._args import positive_int, require_device

SHAPES = [("SmolLM2 q_proj", 576, 576), ("SmolLM2 v_proj", 192, 576),
          ("LLaMA-3.2-3B q_proj", 3072, 3072), ("LLaMA-3.2-3B v_proj", 1024, 3072)]
Row = Dict[str, object]


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired_medians(ref: Callable[[], object], fast: Callable[[], object], repeats: int,
                   device: torch.device) -> Tuple[float, float]:
    """Median seconds of each, timed alternately after two warm-up calls of each."""
    t_ref, (t_fast,) = medians_after_reference(ref, [fast], repeats, device)
    return t_ref, t_fast


def medians_after_reference(ref: Callable[[], object], others: Sequence[Callable[[], object]], repeats: int,
                            device: torch.device) -> Tuple[float, List[float]]:
    """Median seconds of the reference and of each other call, every one of those timed right
    after a reference call (ref, other₁, ref, other₂, …), after two warm-up calls of each."""
    for _ in range(2):
        for other in others:
            ref()
            other()
    t_ref: List[float] = []
    t_others: List[List[float]] = [[] for _ in others]
    for _ in range(repeats):
        for other, times in zip(others, t_others):
            t_ref.append(_seconds(ref, device))
            times.append(_seconds(other, device))
    return statistics.median(t_ref), [statistics.median(t) for t in t_others]


class _NoWork(torch.autograd.Function):
    """The penalty's autograd round trip without its kernel: forward hands back a value computed
    beforehand, backward scales gradients computed beforehand (as ``ops`` does with the kernel's)."""

    @staticmethod
    def forward(ctx, omega, a, b, a_ref, b_ref, value, grad_a, grad_b):  # type: ignore[override]
        ctx.grads = (grad_a, grad_b)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_a, grad_b = ctx.grads
        return None, grad_out * grad_a, grad_out * grad_b, None, None, None, None, None


def _no_work_penalty(x: Dict[str, torch.Tensor], s: float = 4.0) -> Callable[[], None]:
    """The no-work Function on the benchmark's penalty inputs (its results are hlora's)."""
    a, b = _trainable_factors(x)
    value = ops.importance_penalty(x["omega"], a, b, x["a0"], x["b0"], scaling=s)
    value.backward()
    results = (value.detach(), a.grad.clone(), b.grad.clone())

    def call():
        a.grad = b.grad = None
        _NoWork.apply(x["omega"], a, b, x["a0"], x["b0"], *results).backward()

    return call


def _inputs(out: int, inn: int, rank: int, device: torch.device) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(out * 7 + inn)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    x = {"omega": rnd(out, inn).abs(), "a0": rnd(rank, inn, scale=0.02), "b0": rnd(out, rank, scale=0.02),
         "ga": rnd(rank, inn, scale=1e-3), "gb": rnd(out, rank, scale=1e-3)}
    x["a1"] = x["a0"] + rnd(rank, inn, scale=1e-4)
    x["b1"] = x["b0"] + rnd(out, rank, scale=1e-4)
    return x


def _trainable_factors(x: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The adapter's A and B as leaves the penalty's backward writes gradients to."""
    return x["a1"].clone().requires_grad_(), x["b1"].clone().requires_grad_()


def _op_calls(impl, x: Dict[str, torch.Tensor], s: float = 4.0, lr: float = 8e-4) -> Dict[str, Callable]:
    a, b = _trainable_factors(x)

    def accumulate():
        impl.accumulate_omega_(x["omega"], x["a0"], x["b0"], x["ga"], x["gb"], x["a1"], x["b1"], lr=lr, scaling=s)

    def finalize():
        impl.finalize_importance(x["omega"], x["a1"], x["b1"], scaling=s, xi=1e-3, a_start=x["a0"], b_start=x["b0"])

    def penalty():
        a.grad = b.grad = None
        impl.importance_penalty(x["omega"], a, b, x["a0"], x["b0"], scaling=s).backward()

    return {"omega update": accumulate, "finalize": finalize, "penalty fwd+bwd": penalty}


#: Passes over (out, in) memory the fused kernel must make: ω read+write; ω read + Ω write; Ω read.
PASSES = {"omega update": 2, "finalize": 2, "penalty fwd+bwd": 1}
#: The op timed beside the no-work autograd Function.
DIFFERENTIABLE = "penalty fwd+bwd"


def run(threads: int = 2, repeats: int = 21, device: str = "cpu", rank: int = 8,
        shapes: Optional[List[Tuple[str, int, int]]] = None) -> List[Row]:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    rows: List[Row] = []
    for name, out, inn in shapes or SHAPES:
        x = _inputs(out, inn, rank, dev)
        nbytes = x["omega"].numel() * x["omega"].element_size()
        src, dst = torch.empty_like(x["omega"]), torch.empty_like(x["omega"])
        copy_s, _ = paired_medians(lambda: dst.copy_(src), lambda: None, repeats, dev)  # noqa: B023
        copy_gbs = 2 * nbytes / copy_s / 1e9
        ref_calls, fast_calls = _op_calls(reference, x), _op_calls(ops, x)
        for op, ref_call in ref_calls.items():
            others = [fast_calls[op]] + ([_no_work_penalty(x)] if op == DIFFERENTIABLE else [])
            t_ref, (t_fast, *t_floor) = medians_after_reference(ref_call, others, repeats, dev)
            gbs = PASSES[op] * nbytes / t_fast / 1e9
            row: Row = {"shape": f"{name} ({out}x{inn})", "op": op, "reference_ms": t_ref * 1e3,
                        "hlora_ms": t_fast * 1e3, "speedup": t_ref / t_fast, "hlora_GBps": gbs,
                        "copy_GBps": copy_gbs, "of_copy": gbs / copy_gbs}
            if t_floor:
                row.update(no_work_ms=t_floor[0] * 1e3, ceiling=t_ref / t_floor[0])
            rows.append(row)
    return rows


#: Where the providers are compared: SmolLM2's shapes and LLaMA-3.2-3B's v_proj, one matrix per
#: call, and one `_many` call over 56 small matrices, where what is timed is mostly the call's
#: fixed cost (reading 7 tensors per matrix, making the results) rather than the kernels.
PROVIDER_SHAPES = [("SmolLM2 q_proj", 576, 576, 1), ("SmolLM2 v_proj", 192, 576, 1),
                   ("LLaMA-3.2-3B v_proj", 1024, 3072, 1), ("56 matrices of 16x16, one _many call", 16, 16, 56)]


def _many_calls(mats: List[Dict[str, torch.Tensor]], s: float = 4.0, lr: float = 8e-4) -> Dict[str, Callable]:
    """The ω update and the penalty (forward + backward) as one `_many` call over ``mats``."""
    a = [x["a1"].clone().requires_grad_() for x in mats]
    b = [x["b1"].clone().requires_grad_() for x in mats]

    def lists(*keys: str) -> List[List[torch.Tensor]]:
        return [[x[k] for x in mats] for k in keys]

    def accumulate():
        ops.accumulate_omega_many_(*lists("omega", "a0", "b0", "ga", "gb", "a1", "b1"), lr=lr, scaling=s)

    def penalty():
        for t in (*a, *b):
            t.grad = None
        ops.importance_penalty_many(lists("omega")[0], a, b, *lists("a0", "b0"), scaling=s).backward()

    return {"omega update": accumulate, "penalty fwd+bwd": penalty}


def run_providers(threads: int = 2, repeats: int = 21, device: str = "cpu", rank: int = 8,
                  shapes: Optional[List[Tuple[str, int, int, int]]] = None) -> List[Row]:
    """hlora's calls under each provider this build has, timed alternately call by call (one
    provider, then the other), medians: what reading tensors through Python attributes (view)
    costs against reading them through libtorch (tch)."""
    from hlora import _loader

    providers = hlora.backend_info()["providers"]
    if not providers:
        return []
    torch.set_num_threads(threads)
    dev = torch.device(device)
    before = hlora.backend_info()["provider"]
    rows: List[Row] = []
    try:
        for name, out, inn, count in shapes or PROVIDER_SHAPES:
            mats = [_inputs(out + i % 3, inn, rank, dev) for i in range(count)]
            if count == 1:
                calls = {op: fn for op, fn in _op_calls(ops, mats[0]).items() if op != "finalize"}
            else:
                calls = _many_calls(mats)
            for op, fn in calls.items():
                times: Dict[str, List[float]] = {p: [] for p in providers}
                for i in range(repeats + 2):
                    for p in providers:
                        _loader.set_provider(p)
                        t = _seconds(fn, dev)
                        if i >= 2:  # warm-up
                            times[p].append(t)
                row: Row = {"shape": name if count > 1 else f"{name} ({out}x{inn})", "op": op}
                for p in providers:
                    row[f"{p}_ms"] = statistics.median(times[p]) * 1e3
                if len(providers) == 2:
                    row["view_minus_tch_ms"] = row["view_ms"] - row["tch_ms"]
                    row["view_over_tch"] = row["view_ms"] / row["tch_ms"]
                rows.append(row)
    finally:
        _loader.set_provider(before)
    return rows


def format_providers(rows: List[Row]) -> str:
    if not rows:
        return "(the plain-PyTorch backend has no providers)"
    both = "view_minus_tch_ms" in rows[0]
    providers = [k[:-3] for k in rows[0] if k.endswith("_ms") and k != "view_minus_tch_ms"]
    head = "| shape | op | " + " | ".join(f"{p} (ms)" for p in providers) + (" | view − tch (ms) | view / tch |"
                                                                              if both else " |")
    lines = [head, "|---|---|" + "---:|" * (len(providers) + (2 if both else 0))]
    for r in rows:
        cells = " | ".join(f"{r[f'{p}_ms']:.3f}" for p in providers)
        extra = f" | {r['view_minus_tch_ms']:+.3f} | {r['view_over_tch']:.2f} |" if both else " |"
        lines.append(f"| {r['shape']} | {r['op']} | {cells}{extra}")
    return "\n".join(lines)


def format_table(rows: List[Row]) -> str:
    lines = ["| shape | op | reference (ms) | hlora (ms) | speed-up | hlora GB/s | copy GB/s | % of copy |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['op']} | {r['reference_ms']:.2f} | {r['hlora_ms']:.2f} | "
                     f"{r['speedup']:.1f}x | {r['hlora_GBps']:.1f} | {r['copy_GBps']:.1f} | "
                     f"{100 * r['of_copy']:.0f}% |")
    return "\n".join(lines)


def format_ceilings(rows: List[Row]) -> str:
    """The penalty rows against the no-work autograd Function (see the module's docstring)."""
    lines = ["| shape | reference (ms) | no-work autograd Function (ms) | ceiling | hlora speed-up |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "ceiling" in r:
            lines.append(f"| {r['shape']} | {r['reference_ms']:.2f} | {r['no_work_ms']:.3f} | "
                         f"{r['ceiling']:.1f}x | {r['speedup']:.1f}x |")
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hlora bench", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="CPU threads, the reference's and the kernels' (default: %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=21,
                        help="timed calls per op and shape; the tables show medians (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the inputs live and the ops run (default: %(default)s)")
    parser.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    require_device(parser, args.device)
    threading = ""
    if hlora.backend() == "rust":
        info = hlora.backend_info()
        threading = (f" provider={info['provider']} (built: {', '.join(info['providers'])})"
                     f" cpu-threads-on={info['cpu_threading']} simd={info['simd']}")
    print(f"hlora {hlora.__version__} backend={hlora.backend()} torch {torch.__version__} "
          f"device={args.device} threads={args.threads}{threading} r={args.rank} repeats={args.repeats} (medians)")
    # Ratios differ between machines of one kind (the reference's GEMMs use what the CPU has).
    print(f"cpu: {_cpu_model()}, torch's CPU kernels: {torch.backends.cpu.get_cpu_capability()}")
    # torch's OpenMP workers busy-wait after each op unless told otherwise, and glibc's allocator
    # settings decide whether the reference page-faults its temporaries: each changes the ratios.
    settings = ("OMP_WAIT_POLICY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    print(" ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in settings))
    rows = run(args.threads, args.repeats, args.device, args.rank)
    print(format_table(rows))
    print(f"\n{DIFFERENTIABLE}: an autograd.Function that does no work, timed after the reference's calls as "
          "hlora's are; reference / its time is the most a differentiable penalty can gain here.")
    print(format_ceilings(rows))
    provider_rows = run_providers(args.threads, args.repeats, args.device, args.rank)
    print("\nPer call, by provider (the providers alternating call by call):")
    print(format_providers(provider_rows))
    if args.json:
        write_json_atomic(args.json, rows + provider_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
