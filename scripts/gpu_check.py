"""Device check of the fused CUDA kernels (issue 5), in one run:

1. correctness: every op against hlora.reference (float64) on fresh random inputs at odd and
   real shapes, every factor dtype, the caching allocator poisoned with NaN before each call;
   the many-matrix entry points over 70 matrices; the effect of bfloat16 Ω storage;
2. timings (CUDA events, medians): each op over a whole model's matrices — fused kernels vs
   the plain-PyTorch reference vs the tch path — and vs its floor
   max(bytes / measured copy bandwidth, FLOPs / measured fp32 rate);
3. overhead per optimizer step on random-weight LLaMA-3.2-3B- and GPT-J-6B-shaped models
   (bf16, r = 8, q/v, 4096 tokens per step), through hlora.experiments.bench_training.

    python scripts/gpu_check.py --out docs/gpu_check.md     # on a GPU
    python scripts/gpu_check.py --dry-run                   # on CPU: the same code through the
                                                            # kernels' CPU emulator, small shapes
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Tuple

import torch

import hlora
from hlora import _native, ops, reference
from hlora._io import write_text_atomic
from hlora.experiments import bench_training

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import FACTOR_DTYPES, FORWARD_TOL, GRAD_TOL, cancelling_omega, make_step, rel_err  # noqa: E402

Lines = List[str]


def poison(device: str) -> None:
    if device == "cuda":
        junk = torch.full((256 << 20,), float("nan"), device=device)
        del junk


def check_ops(device: str, shapes: List[Tuple[int, int, int]], out: Lines) -> bool:
    out += ["## Correctness (‖x − ref‖/‖ref‖ vs float64 reference; outputs poisoned)", "",
            "| shape (out, in, r) | factors | ω update | Ω finalize | P | ∂P/∂A | ∂P/∂B | tol fwd / grad | ok |",
            "|---|---|---:|---:|---:|---:|---:|---|---|"]
    all_ok = True
    for shape in shapes:
        for dtype in FACTOR_DTYPES:
            o, i, r = shape
            step = make_step(o, i, r, dtype, seed=o * 7 + i + r, device=device)
            want = step.omega.double().clone()
            reference.accumulate_omega_(want, *(t.double() for t in step.args()[1:]), lr=1e-3, scaling=2.0)
            poison(device)
            ops.accumulate_omega_(*step.args(), lr=1e-3, scaling=2.0)
            e_om = rel_err(step.omega, want)
            poison(device)
            big = ops.finalize_importance(step.omega, step.a1, step.b1, scaling=2.0, xi=1e-3,
                                          a_start=step.a0, b_start=step.b0)
            e_fin = rel_err(big, reference.finalize_importance(
                step.omega.double(), step.a1.double(), step.b1.double(), scaling=2.0, xi=1e-3,
                a_start=step.a0.double(), b_start=step.b0.double()))
            # Ω of order 1 for the penalty (a finalized Ω can be tiny: its low-precision
            # gradients would be subnormal and measure the format, not the kernel).
            weights = torch.rand(step.omega.shape, generator=torch.Generator().manual_seed(o + i)).to(device)
            a, b = step.a1.clone().requires_grad_(), step.b1.clone().requires_grad_()
            a64, b64 = step.a1.double().clone().requires_grad_(), step.b1.double().clone().requires_grad_()
            poison(device)
            p = ops.importance_penalty(weights, a, b, step.a0, step.b0, scaling=2.0)
            p.backward()
            p64 = reference.importance_penalty(weights.double(), a64, b64, step.a0.double(), step.b0.double(),
                                               scaling=2.0)
            p64.backward()
            errs = [e_om, e_fin, rel_err(p, p64), rel_err(a.grad, a64.grad), rel_err(b.grad, b64.grad)]
            tf, tg = FORWARD_TOL[dtype], GRAD_TOL[dtype]
            ok = all(e <= tf for e in errs[:3]) and all(e <= tg for e in errs[3:])
            all_ok &= ok
            out.append(f"| {shape} | {str(dtype).replace('torch.', '')} | "
                       + " | ".join(f"{e:.1e}" for e in errs) + f" | {tf:.0e} / {tg:.0e} | {'yes' if ok else 'NO'} |")
    # Many matrices: more than one launch's table, odd shapes.
    steps = [make_step(1 + (7 * k) % 67, 1 + (13 * k) % 150, 1 + k % 11, torch.float32, seed=k, device=device)
             for k in range(70)]
    want = [s.omega.double().clone() for s in steps]
    for w, s in zip(want, steps):
        reference.accumulate_omega_(w, *(t.double() for t in s.args()[1:]), lr=1e-3, scaling=2.0)
    poison(device)
    ops.accumulate_omega_many_(*[list(c) for c in zip(*(s.args() for s in steps))], lr=1e-3, scaling=2.0)
    e_many = max(rel_err(s.omega, w) for s, w in zip(steps, want))
    omegas = [s.omega.abs() for s in steps]
    poison(device)
    total = ops.importance_penalty_many(omegas, [s.a1 for s in steps], [s.b1 for s in steps],
                                        [s.a0 for s in steps], [s.b0 for s in steps], scaling=2.0)
    want_total = reference.importance_penalty_many([o.double() for o in omegas], [s.a1.double() for s in steps],
                                                   [s.b1.double() for s in steps], [s.a0.double() for s in steps],
                                                   [s.b0.double() for s in steps], scaling=2.0)
    e_pen = rel_err(total, want_total)
    # Signed Ω (clamp="none"): P cancels, and the blocks with a negative Ω form D in float64.
    signed = [torch.randn(s.omega.shape, generator=torch.Generator().manual_seed(k)).to(device)
              for k, s in enumerate(steps)]
    args = [[s.a1 for s in steps], [s.b1 for s in steps], [s.a0 for s in steps], [s.b0 for s in steps]]
    args64 = [[t.double() for t in col] for col in args]
    e_signed = max(rel_err(ops.importance_penalty(o, *(c[k] for c in args), scaling=2.0),
                           reference.importance_penalty(o.double(), *(c[k] for c in args64), scaling=2.0))
                   for k, o in enumerate(signed))
    # Ω ≥ 0 in whole tiles (rows < 64), < 0 below, cancelling to 1e-4: penalty_sums re-sums.
    step = make_step(192, 300, 8, torch.float32, seed=5, device=device)
    a64, b64, a064, b064 = (t.double() for t in (step.a1, step.b1, step.a0, step.b0))
    d64 = reference._delta(a64, b64, 1.3, a064, b064, 1.3)
    tiles = cancelling_omega(d64.cpu(), 1e4, seed=6, negative_from_row=64).to(device)
    e_tiles = rel_err(ops.importance_penalty(tiles, step.a1, step.b1, step.a0, step.b0, scaling=1.3),
                      reference.importance_penalty(tiles.double(), a64, b64, a064, b064, scaling=1.3))
    ok = e_many <= 1e-5 and e_pen <= 1e-5 and e_signed <= 1e-5 and e_tiles <= 1e-5
    all_ok &= ok
    out += ["", f"70 matrices in one call (two launches): ω update max rel {e_many:.1e}, Σ P rel {e_pen:.1e}; "
            f"P over randn Ω, each matrix: max rel {e_signed:.1e}; P over Ω signed by whole tiles, "
            f"cancelling to 1e-4: rel {e_tiles:.1e} ({'ok' if ok else 'FAILED'})"]
    # bfloat16 storage of Ω: what the penalty loses.
    step = make_step(1024, 3072 if device == "cuda" else 300, 8, torch.float32, seed=3, device=device)
    big = torch.rand(step.omega.shape, device=device)
    full = _native.importance_penalty(big, step.a1, step.b1 * 1.1, step.a0, step.b0, scaling=2.0)
    half = _native.importance_penalty(big.bfloat16(), step.a1, step.b1 * 1.1, step.a0, step.b0, scaling=2.0)
    out += ["bfloat16 Ω storage (half the bytes per penalty pass) vs float32 Ω: relative change of "
            f"P {rel_err(half[0], full[0]):.1e}, ∂P/∂A {rel_err(half[1], full[1]):.1e}, "
            f"∂P/∂B {rel_err(half[2], full[2]):.1e}", ""]
    return all_ok


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of `fn` (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_rates(device: str) -> Tuple[float, float]:
    """(copy bandwidth B/s, fp32 FLOP/s) measured here: the floors' denominators."""
    n = (1 << 28) if device == "cuda" else (1 << 22)
    x = torch.rand(n, device=device)
    y = torch.empty_like(x)
    bw = 2 * x.nbytes / timed(lambda: y.copy_(x), device, 10)
    m = 8192 if device == "cuda" else 512
    a, b = torch.rand(m, m, device=device), torch.rand(m, m, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    flops = 2 * m ** 3 / timed(lambda: a @ b, device, 5)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return bw, flops


MODELS = {  # (q shape, v shape) × layers, as adapted with r = 8 on q_proj + v_proj
    "LLaMA-3.2-3B": ([(3072, 3072), (1024, 3072)], 28),
    "GPT-J-6B": ([(4096, 4096), (4096, 4096)], 28),
    "tiny (dry run)": ([(128, 128), (64, 128)], 4),
}


def op_cases(steps, r: int) -> list:
    """(op, fused call, reference call, bytes, FLOPs) over all matrices of `steps`."""
    n = sum(s.omega.numel() for s in steps)
    cols = [list(c) for c in zip(*(s.args() for s in steps))]
    omegas = [s.omega.abs() for s in steps]
    a = [s.a1.clone().requires_grad_() for s in steps]
    b = [s.b1.clone().requires_grad_() for s in steps]
    refs = dict(a_ref=[s.a0 for s in steps], b_ref=[s.b0 for s in steps])

    def update(impl=ops):
        impl.accumulate_omega_many_(*cols, lr=1e-3, scaling=4.0)

    def finalize(impl=ops):
        for s in steps:
            impl.finalize_importance(s.omega, s.a1, s.b1, scaling=4.0, xi=1e-3, a_start=s.a0, b_start=s.b0)

    def finalize_many():
        ops.finalize_importance_many([s.omega for s in steps], [s.a1 for s in steps], [s.b1 for s in steps],
                                     [s.a0 for s in steps], [s.b0 for s in steps], scaling=4.0, xi=1e-3)

    def penalty(impl=ops, om=omegas):
        impl.importance_penalty_many(om, a, b, scaling=4.0, **refs).backward()

    bf16_omegas = [o.bfloat16() for o in omegas]
    signed_omegas = [o * torch.randn_like(o).sign() for o in omegas]  # every block votes float64 D
    return [  # (op, fused, reference, bytes, flops)
        ("ω update", update, lambda: update(reference), 8 * n, (8 * r + 3) * n),
        ("Ω finalize (+ norms)", finalize_many, lambda: finalize(reference), 8 * n, (4 * r + 5) * n),
        ("penalty fwd+bwd", penalty, lambda: penalty(reference), 4 * n, (8 * r + 3) * n),
        ("penalty fwd+bwd, bf16 Ω", lambda: penalty(om=bf16_omegas), lambda: penalty(reference, bf16_omegas),
         2 * n, (8 * r + 3) * n),
        ("penalty fwd+bwd, signed Ω", lambda: penalty(om=signed_omegas),
         lambda: penalty(reference, signed_omegas), 4 * n, (8 * r + 3) * n),
    ]


def time_ops(device: str, models: List[str], repeats: int, out: Lines) -> None:
    bw, flops = machine_rates(device)
    out += ["## Timings (median; one call covers every adapted matrix of the model)", "",
            f"Measured here: copy bandwidth {bw / 1e9:.0f} GB/s, fp32 rate {flops / 1e12:.1f} TFLOP/s.", "",
            "| model | op | fused | reference | tch path | floor | fused / floor | reference / fused |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    r = 8
    for name in models:
        shapes, layers = MODELS[name]
        steps = [make_step(o, i, r, torch.bfloat16, seed=k, device=device)
                 for k, (o, i) in enumerate(shapes * layers)]
        cases = op_cases(steps, r)
        for op, fused, ref, nbytes, nflops in cases:
            print(f"timing {name}: {op}", file=sys.stderr, flush=True)
            t_fused = timed(fused, device, repeats)
            t_ref = timed(ref, device, max(3, repeats // 3))
            t_tch = None  # the tch path: the tch provider's only
            if hlora.backend_info()["provider"] == "tch":
                path = _native.cuda_path() if device == "cuda" else _native.cpu_path()
                if device == "cuda":
                    _native.set_cuda_path("tch")
                else:
                    _native.set_cpu_path("tch")
                t_tch = timed(fused, device, repeats)
                if device == "cuda":
                    _native.set_cuda_path(path)
                else:
                    _native.set_cpu_path(path, emulator=EMULATOR[0] if path == "cuda-emulator" else None)
            floor = max(nbytes / bw, nflops / flops)
            tch_cell = "—" if t_tch is None else f"{t_tch * 1e3:.3f} ms"
            out.append(f"| {name} | {op} | {t_fused * 1e3:.3f} ms | {t_ref * 1e3:.3f} ms | {tch_cell} | "
                       f"{floor * 1e3:.3f} ms | {t_fused / floor:.2f} | {t_ref / t_fused:.1f}× |")
        del steps, cases
        if device == "cuda":
            torch.cuda.empty_cache()
    out.append("")


def overhead(device: str, models: List[str], out: Lines) -> None:
    out += ["## Overhead per optimizer step (hlora.experiments.bench_training; bf16, r = 8, q/v, 4096 tokens/step)", "",
            "| model | LoRA step | recording | penalty fwd+bwd | matrices | ω entries |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, batch, seq, dtype in models:
        print(f"overhead: {name}", file=sys.stderr, flush=True)
        try:
            res = bench_training.run(name, steps=6, batch=batch, seq=seq, device=device, dtype=dtype, r=8)
        except Exception as exc:  # one model failing (memory, a transformers change) keeps the others' rows
            out.append(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} | | | | |")
            continue
        out.append(f"| {name} | {res['step_s'] * 1e3:.1f} ms | {res['record_s'] * 1e3:.2f} ms "
                   f"({res['record_pct']:.2f} %) | {res['penalty_s'] * 1e3:.2f} ms ({res['penalty_pct']:.2f} %) | "
                   f"{res['matrices']} | {res['omega_entries'] / 1e6:.1f} M |")
        if device == "cuda":
            torch.cuda.empty_cache()
    out.append("")


EMULATOR: List[str] = []


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, kernels' emulator, small shapes")
    parser.add_argument("--out", default=None, help="also write the report (markdown) here")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--providers", default=",".join(hlora.backend_info()["providers"]),
                        help="the providers to check, each in turn (default: every one this build has: %(default)s)")
    args = parser.parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    out: Lines = []
    if args.dry_run:
        import cuda_emulator

        device = "cpu"
        EMULATOR.append(str(cuda_emulator.build(Path("target/cuda_emulator"))))
        _native.set_cpu_path("cuda-emulator", emulator=EMULATOR[0])
        shapes = [(1, 1, 1), (7, 5, 3), (65, 129, 9)]
        models, repeats = ["tiny (dry run)"], 3
        training = [("tiny", 1, 64, torch.float32)]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
            return 2
        device = "cuda"
        status = _native.cuda_status(torch.cuda.current_device())
        if not status.startswith("fused"):
            print(f"fused kernels unavailable: {status}", file=sys.stderr)
            return 1
        shapes = [(1, 1, 1), (7, 5, 3), (65, 129, 9), (576, 576, 8), (192, 576, 8), (3072, 1024, 8),
                  (1024, 3072, 64)]
        models, repeats = ["LLaMA-3.2-3B", "GPT-J-6B"], 15
        training = [("llama-3b-shape", 1, 4096, torch.bfloat16), ("gptj-6b-shape", 1, 4096, torch.bfloat16)]
    if device == "cuda":
        where = f"{torch.cuda.get_device_name()}; CUDA path {_native.cuda_status(torch.cuda.current_device())}"
        if os.environ.get("HLORA_CUDA_DEFINES"):
            where += f" with HLORA_CUDA_DEFINES={os.environ['HLORA_CUDA_DEFINES']!r}"
    else:
        where = f"{platform.processor() or 'CPU'}; dry run, CPU path {_native.cpu_path()}"
    command = "python scripts/gpu_check.py" + (" --dry-run" if args.dry_run else "")
    out += [f"# hlora GPU check — {time.strftime('%Y-%m-%d')}", "",
            f"{where}; torch {torch.__version__}; hlora {hlora.__version__} (backend {hlora.backend()}, "
            f"providers {', '.join(providers)}); "
            f"command: `{command}`", ""]
    t0 = time.perf_counter()
    shown = 0

    def report() -> None:
        # Each part is printed and saved as it ends: device minutes are scarce, and a part that
        # fails or runs out of time must not take the parts before it with it.
        nonlocal shown
        print("\n".join(out[shown:]), flush=True)
        shown = len(out)
        if args.out:
            write_text_atomic(args.out, "\n".join(out) + "\n")

    ok = True
    for provider in providers:
        # Each provider in turn: the same checks and timings (the view provider reads tensors
        # through Python, the tch provider through libtorch).
        hlora._loader.set_provider(provider)
        out += [f"# Provider: {provider}", ""]
        ok = check_ops(device, shapes, out) and ok
        report()
        try:
            time_ops(device, models, repeats, out)
        except Exception as exc:  # keep the correctness table and go on to the overhead
            traceback.print_exc()
            out += [f"Timings stopped: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", ""]
            if device == "cuda":
                torch.cuda.empty_cache()
        report()
        if not args.skip_overhead:
            overhead(device, training, out)
    out.append(f"Total {time.perf_counter() - t0:.0f} s. Correctness: {'all within tolerance' if ok else 'FAILURES'}.")
    report()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
