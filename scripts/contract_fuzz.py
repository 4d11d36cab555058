"""A time-boxed random campaign of the kernels (hlora.ops) against DESIGN §1's formulas, beyond
the test suite's fixed cases: random shapes (1–700, r 1–64), magnitudes, steps down to 1e-7 of
the factors, scalings, ξ, clamps, stored-Ω dtypes, layouts (transposed, strided), NumPy inputs,
many-matrix calls (penalty; ω update then finalization and norms) with mixed dtypes.

    python scripts/contract_fuzz.py [--seconds 60] [--seed 0] [--threads 1] [--device cpu|cuda]
    python scripts/contract_fuzz.py --seed 0 --replay 1234     # one case again, by its number
    python scripts/contract_fuzz.py --cpu-path cuda-emulator   # the CUDA kernels' code, on a CPU

The exact values are the formulas in their cancellation-free forms, in float64 for the float32
maths and in long double for float64 factors. Tolerances are DESIGN §2's: ≤ 1e-5 for the float32
maths; gradients of bfloat16/float16 factors ≤ 1e-2, or within one unit in their last place of
the exact gradient (float16's subnormals round coarser than 1e-2; a gradient float16 cannot hold
is skipped); float64 ≤ 1e-12 — or, where the inputs make that unreachable in float64 (a Δ that
nearly cancels, with ξ below its rounding), at most 16× the error hlora.reference's float64 torch
maths makes on the same inputs (its error is itself a random draw: ours, in another summation
order, measured up to 8× it), and for finalization at most the rounding bound of any float64
evaluation (one dominant entry makes the reference's draw a lucky one at times). Prints per
(op, dtype) the cases and the worst error against its tolerance, then each failing case; exit
status 1 if any failed.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import hlora
from hlora import ops, reference

LOW = (torch.bfloat16, torch.float16)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
Result = Tuple[str, float, float]  # (name, error, tolerance)


class Case:
    """One random case: its own random streams (seeded by the campaign's seed and its number), the
    device it runs on, and the checks it made."""

    def __init__(self, seed: int, number: int, device: torch.device):
        self.rng = random.Random(seed * 1_000_003 + number)
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + number)
        self.device = device
        self.results: List[Result] = []

    def log_uniform(self, lo: float, hi: float) -> float:
        return 10 ** self.rng.uniform(math.log10(lo), math.log10(hi))

    def dim(self) -> int:
        return self.rng.choice([1, 2, 3, 7, 15, 16, 17, 33, 64, 65, 127, 129, 192, 257, 576,
                                self.rng.randint(1, 700)])

    def rank(self) -> int:
        return self.rng.choice([1, 2, 3, 7, 8, 9, 16, 31, 64])

    def randn(self, *shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale).to(dtype)

    def near(self, t: torch.Tensor, step: float) -> torch.Tensor:
        """``t`` moved by ``step`` of its own scale, in t's dtype."""
        scale = float(t.double().abs().mean()) or 1.0
        return (t.double() + self.randn(*t.shape, scale=scale * step)).to(t.dtype)

    def placed(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """On the case's device, sometimes in a non-contiguous layout with the same values."""
        if t is None:
            return None
        t = t.to(self.device)
        pick = self.rng.random()
        if pick < 0.12:
            return t.t().contiguous().t()
        if pick < 0.24:
            wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
            wide[:, ::2] = t
            return wide[:, ::2]
        return t

    def check(self, name: str, err: float, tol: float) -> None:
        self.results.append((name, err, tol))


def _np(t: torch.Tensor, high: bool) -> np.ndarray:
    return t.detach().cpu().double().numpy().astype(np.longdouble if high else np.float64)


def _delta(a, b, s: float, a2=None, b2=None, s2: Optional[float] = None):
    """s·B·A − s2·B2·A2 written without cancellation (NumPy arrays of the working precision)."""
    if a2 is None:
        return s * (b @ a)
    s2 = s if s2 is None else s2
    left = s * (b - b2) if s2 == s else s * b - s2 * b2
    return left @ a + s2 * (b2 @ (a - a2))


def _rel(x, exact) -> float:
    x, exact = np.asarray(x, dtype=exact.dtype), np.asarray(exact)
    n = float(np.linalg.norm(exact.astype(np.float64)))
    d = float(np.linalg.norm((x - exact).astype(np.float64)))
    return d / n if n > 0 else d


def _tolerance(dtype: torch.dtype, ours: float, reference_error: Callable[[], float]) -> float:
    """DESIGN §2's bound; for float64, relaxed to 16× the float64 reference's own error where the
    inputs make 1e-12 unreachable for any float64 evaluation (asked only then: it costs a call)."""
    if dtype != torch.float64:
        return 1e-5
    return 1e-12 if ours <= 1e-12 else max(1e-12, 16 * reference_error())


def _finalization_bound(a, b, s: float, a_start, b_start, xi: float, d, exact) -> float:
    """For float64 factors, the relative error any float64 evaluation of Ω = ω/(Δ² + ξ) may make:
    Δ's rounding, at most (r + 3)·u·Σ|terms| per entry (the terms of its cancellation-free form),
    magnified by 2|Δ|/(Δ² + ξ), as a norm over Ω. Where a Δ nearly cancels, its Ω entry dominates
    ‖Ω‖, and which summation order errs least there is a random draw within this bound."""
    u = 2.0**-53
    if a_start is None:
        terms = abs(s) * (np.abs(b) @ np.abs(a))
    else:
        terms = abs(s) * (np.abs(b - b_start) @ np.abs(a) + np.abs(b_start) @ np.abs(a - a_start))
    entry = 2 * np.abs(d) * (a.shape[0] + 3) * u * terms / (d * d + xi) + 4 * u
    norm = float(np.linalg.norm(exact.astype(np.float64)))
    return float(np.linalg.norm((np.abs(exact) * entry).astype(np.float64))) / norm if norm > 0 else 0.0


def _grad_error(got: torch.Tensor, exact: np.ndarray, dtype: torch.dtype) -> Optional[float]:
    """Relative error of a gradient; for bfloat16/float16, 0 when every element is within one unit
    in the last place of the exact value in that dtype, None when that dtype cannot hold it."""
    err = _rel(got.detach().cpu().double().numpy(), exact.astype(np.float64))
    if dtype not in LOW or err <= 1e-2:
        return err
    rounded = torch.from_numpy(exact.astype(np.float64)).to(dtype)
    if not torch.isfinite(rounded).all():
        return None
    ulp = (torch.nextafter(rounded, torch.full_like(rounded, math.inf)).double() - rounded.double()).abs()
    off = (got.detach().cpu().double() - torch.from_numpy(exact.astype(np.float64))).abs()
    return 0.0 if bool((off <= ulp).all()) else err


class Step:
    """One optimizer step of one random matrix (factors before and after, gradients, ω before),
    and the exact ω after it under a given lr and clamp."""

    def __init__(self, c: Case, dtype: torch.dtype, lr: float, clamp: bool):
        out, inn, r = c.dim(), c.dim(), c.rank()
        self.dtype, self.high, self.lr, self.clamp = dtype, dtype == torch.float64, lr, clamp
        self.s, mag = c.log_uniform(0.01, 64), c.log_uniform(1e-3, 1.0)
        a0, b0 = c.randn(r, inn, scale=mag, dtype=dtype), c.randn(out, r, scale=mag, dtype=dtype)
        ga = c.randn(r, inn, scale=c.log_uniform(1e-5, 1), dtype=dtype)
        gb = c.randn(out, r, scale=c.log_uniform(1e-5, 1), dtype=dtype)
        step = c.log_uniform(1e-7, 1e-1)
        a1, b1 = c.near(a0, step), c.near(b0, step)
        if c.rng.random() < 0.2:
            b0 = torch.zeros_like(b0)  # a fresh adapter's first step
        self.factors = (a0, b0, ga, gb, a1, b1)
        A0, B0, GA, GB, A1, B1 = (_np(t, self.high) for t in self.factors)
        increment = -(self.s * (GB @ A0 + B0 @ GA - lr * (GB @ GA))) * _delta(A1, B1, self.s, A0, B0)
        scale = float(np.abs(increment).mean()) if c.rng.random() < 0.7 else 0.0
        self.omega = c.randn(out, inn, scale=scale, dtype=torch.float64 if self.high else torch.float32)
        self.base = _np(self.omega, self.high)
        self.exact = np.maximum(self.base + increment, 0) if clamp else self.base + increment

    def check(self, c: Case, name: str, got) -> None:
        """The update's own error: ω's previous value subtracted on both sides."""
        got_np = np.asarray(got if isinstance(got, np.ndarray) else got.cpu().numpy()).astype(self.exact.dtype)
        err = _rel(got_np - self.base, self.exact - self.base)

        def reference_error() -> float:
            w = self.omega.clone()
            reference.accumulate_omega_(w, *self.factors, lr=self.lr, scaling=self.s, clamp_negative=self.clamp)
            return _rel(_np(w, self.high) - self.base, self.exact - self.base)

        c.check(f"{name}/{self.dtype}", err, _tolerance(self.dtype, err, reference_error))


def update_case(c: Case, dtype: torch.dtype) -> None:
    step = Step(c, dtype, lr=c.log_uniform(1e-6, 1.0), clamp=c.rng.random() < 0.3)
    placed = [c.placed(t) for t in (step.omega.clone(), *step.factors)]
    if c.device.type == "cpu" and dtype == torch.float32 and c.rng.random() < 0.15:
        placed = [t.numpy() for t in placed]  # NumPy in, written in place
    got = ops.accumulate_omega_(*placed, lr=step.lr, scaling=step.s, clamp_negative=step.clamp)
    step.check(c, "omega update", got)


def many_update_case(c: Case, _: torch.dtype) -> None:
    """accumulate_omega_many_ over 1–5 matrices of mixed dtypes and per-matrix scalings, then
    finalize_importance_many on the ω it left (start factors: the step's first ones) and its norms."""
    lr, clamp, xi = c.log_uniform(1e-6, 1.0), c.rng.random() < 0.3, c.log_uniform(1e-9, 1.0)
    steps = [Step(c, c.rng.choice(DTYPES), lr, clamp) for _ in range(c.rng.randint(1, 5))]
    lists = list(zip(*[[c.placed(t) for t in (st.omega.clone(), *st.factors)] for st in steps]))
    omegas = ops.accumulate_omega_many_(*lists, lr=lr, scaling=[st.s for st in steps], clamp_negative=clamp)
    for st, got in zip(steps, omegas):
        st.check(c, "many: omega update", got)
    # current factors: the step's last ones; start factors: its first ones (as placed above)
    finals, norms = ops.finalize_importance_many(list(omegas), list(lists[5]), list(lists[6]),
                                                 a_start=list(lists[1]), b_start=list(lists[2]),
                                                 scaling=[st.s for st in steps], xi=xi)
    exact_norms = []
    for st, omega, got in zip(steps, omegas, finals):
        a0, b0, _, _, a1, b1 = st.factors
        exact = _check_finalization(c, "many: finalize", got, omega, a1, b1, a0, b0, st.s, xi, clamp=True)
        exact_norms.append(float(np.linalg.norm(exact.astype(np.float64))))
    # the norms of the kernels' own Ω: as accurate as those are (float64 ones may carry the
    # conditioning error allowed above)
    all64 = all(st.high for st in steps)
    omega_errors = [err for name, err, _ in c.results if name.startswith("many: finalize")]
    c.check("many: norms/" + ("float64" if all64 else "mixed"), _rel(norms.cpu().numpy(), np.array(exact_norms)),
            max(1e-12, *omega_errors) if all64 else 1e-5)


def finalize_case(c: Case, dtype: torch.dtype) -> None:
    out, inn, r = c.dim(), c.dim(), c.rank()
    high = dtype == torch.float64
    s, mag, xi = c.log_uniform(0.01, 64), c.log_uniform(1e-3, 1.0), c.log_uniform(1e-9, 1.0)
    a, b = c.randn(r, inn, scale=mag, dtype=dtype), c.randn(out, r, scale=mag, dtype=dtype)
    started = c.rng.random() < 0.6
    step = c.log_uniform(1e-6, 1)
    a_start, b_start = (c.near(a, step), c.near(b, step)) if started else (None, None)
    omega = c.randn(out, inn, scale=c.log_uniform(1e-8, 10), dtype=torch.float64 if high else torch.float32)
    clamp = c.rng.random() < 0.7
    got = ops.finalize_importance(c.placed(omega), c.placed(a), c.placed(b), a_start=c.placed(a_start),
                                  b_start=c.placed(b_start), scaling=s, xi=xi, clamp_negative=clamp)
    _check_finalization(c, "finalize", got, omega, a, b, a_start, b_start, s, xi, clamp)


def _check_finalization(c: Case, name: str, got: torch.Tensor, omega: torch.Tensor, a: torch.Tensor,
                        b: torch.Tensor, a_start: Optional[torch.Tensor], b_start: Optional[torch.Tensor],
                        s: float, xi: float, clamp: bool) -> np.ndarray:
    """Checks a finalized Ω against ω/(Δ² + ξ) (Eq. 13) and returns that exact Ω."""
    high = a.dtype == torch.float64
    fa, fb = _np(a, high), _np(b, high)
    starts = (None, None) if a_start is None else (_np(a_start, high), _np(b_start, high))
    d = _delta(fa, fb, s, *starts)
    exact = _np(omega, high) / (d * d + xi)
    exact = np.maximum(exact, 0) if clamp else exact
    err = _rel(_np(got, high), exact)

    def reference_error() -> float:
        ref = reference.finalize_importance(omega.cpu(), a, b, a_start=a_start, b_start=b_start, scaling=s, xi=xi,
                                            clamp_negative=clamp)
        return _rel(_np(ref, high), exact)

    bound = _finalization_bound(fa, fb, s, *starts, xi, d, exact) if high else 0.0
    c.check(f"{name}/{a.dtype}", err, max(_tolerance(a.dtype, err, reference_error), bound))
    return exact


def _penalty_exact(omega, a, b, a_ref, b_ref, s, s_ref, high) -> Tuple[float, np.ndarray, np.ndarray]:
    fa, fb = _np(a, high), _np(b, high)
    d = _delta(fa, fb, s, *((_np(a_ref, high), _np(b_ref, high), s_ref) if a_ref is not None else ()))
    g = _np(omega, high) * d
    return float((g * d).sum()), 2 * s * (fb.T @ g), 2 * s * (g @ fa.T)


def penalty_case(c: Case, dtype: torch.dtype) -> None:
    out, inn, r = c.dim(), c.dim(), c.rank()
    high = dtype == torch.float64
    s, mag = c.log_uniform(0.01, 64), c.log_uniform(1e-3, 1.0)
    a, b = c.randn(r, inn, scale=mag, dtype=dtype), c.randn(out, r, scale=mag, dtype=dtype)
    kind = c.rng.choice(["fresh", "reference", "reference", "own scaling"])
    a_ref = b_ref = None
    s_ref: Optional[float] = None
    if kind != "fresh":
        step = c.log_uniform(1e-6, 1)
        a_ref, b_ref = c.near(a, step), c.near(b, step)
        if kind == "own scaling":
            s_ref = s * (1 + c.rng.choice([1e-7, 1e-4, 0.1, -0.5]))
    stored = c.rng.choice([torch.float32, torch.float64] if high else [torch.float32, torch.bfloat16, torch.float16])
    omega = c.randn(out, inn, scale=c.log_uniform(1e-3, 1e3)).abs().to(stored)
    value, grad_a, grad_b = _penalty_exact(omega, a, b, a_ref, b_ref, s, s_ref, high)
    a_, b_ = (c.placed(t).detach().requires_grad_() for t in (a, b))  # leaves in the placed layouts
    got = ops.importance_penalty(c.placed(omega), a_, b_, c.placed(a_ref), c.placed(b_ref),
                                 scaling=s, scaling_ref=s_ref)
    got.backward()
    err = abs(float(got.detach()) - value) / abs(value) if value else abs(float(got.detach()))

    def reference_error() -> float:
        ref = reference.importance_penalty(omega, a, b, a_ref, b_ref, scaling=s, scaling_ref=s_ref)
        return abs(float(ref.detach()) - value) / abs(value)

    c.check(f"penalty/{dtype}", err, _tolerance(dtype, err, reference_error))
    _check_grads(c, f"penalty grads/{dtype}", dtype, [(a_.grad, grad_a), (b_.grad, grad_b)],
                 lambda: reference._penalty_grads(omega, a, b, a_ref, b_ref, s, s_ref))


def _check_grads(c: Case, name: str, dtype: torch.dtype, pairs: Sequence[Tuple[Optional[torch.Tensor], np.ndarray]],
                 reference_grads: Callable[[], Sequence[torch.Tensor]]) -> None:
    errors = []
    for got, exact in pairs:
        if got is None or got.dtype != dtype:
            c.check(name + " (missing, or not in the factor's dtype)", math.inf, 0.0)
            return
        err = _grad_error(got, exact, dtype)
        if err is None:
            return  # the gradient does not fit the factor's dtype
        errors.append(err)
    err = max(errors)
    if dtype in LOW:
        c.check(name, err, 1e-2)
        return

    def reference_error() -> float:
        refs = reference_grads()
        return max(_rel(_np(g, True), exact) for g, (_, exact) in zip(refs, pairs))

    c.check(name, err, _tolerance(dtype, err, reference_error))


def many_case(c: Case, _: torch.dtype) -> None:
    """importance_penalty_many over 1–5 matrices of mixed dtypes, per-matrix scalings and weights."""
    dtypes = [c.rng.choice(DTYPES) for _ in range(c.rng.randint(1, 5))]
    mats = []
    for dtype in dtypes:
        out, inn, r = c.dim(), c.dim(), c.rank()
        mag = c.log_uniform(1e-3, 1)
        a, b = c.randn(r, inn, scale=mag, dtype=dtype), c.randn(out, r, scale=mag, dtype=dtype)
        stored = torch.float64 if dtype == torch.float64 else torch.float32
        omega = c.randn(out, inn, scale=c.log_uniform(1e-3, 1e3)).abs().to(stored)
        mats.append((omega, a, b, c.near(a, 1e-2), c.near(b, 1e-2), c.log_uniform(0.01, 64), c.log_uniform(1e-3, 10)))
    exact = [_penalty_exact(o, a, b, ar, br, s, None, dtype == torch.float64)
             for (o, a, b, ar, br, s, _), dtype in zip(mats, dtypes)]
    total = sum(w * v for (*_, w), (v, _, _) in zip(mats, exact))
    leaves = [(c.placed(a).detach().requires_grad_(), c.placed(b).detach().requires_grad_()) for _, a, b, *_ in mats]
    got = ops.importance_penalty_many([c.placed(m[0]) for m in mats], [x for x, _ in leaves], [y for _, y in leaves],
                                      [c.placed(m[3]) for m in mats], [c.placed(m[4]) for m in mats],
                                      scaling=[m[5] for m in mats], weights=[m[6] for m in mats])
    got.backward()
    all64 = all(d == torch.float64 for d in dtypes)
    c.check("many: total/" + ("float64" if all64 else "mixed"), abs(float(got.detach()) - total) / total,
            1e-12 if all64 else 1e-5)
    for (x, y), (_, ga, gb), (o, a, b, ar, br, s, w), dtype in zip(leaves, exact, mats, dtypes):
        _check_grads(c, f"many: grads/{dtype}", dtype, [(x.grad, w * ga), (y.grad, w * gb)],
                     lambda o=o, a=a, b=b, ar=ar, br=br, s=s, w=w: [w * g for g in
                                                                    reference._penalty_grads(o, a, b, ar, br, s, None)])


CASES = [update_case, finalize_case, penalty_case, many_case, many_update_case]


def run_case(seed: int, number: int, device: torch.device) -> Case:
    c = Case(seed, number, device)
    CASES[number % len(CASES)](c, c.rng.choice(DTYPES))
    return c


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to draw cases (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the campaign's seed (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the ops run (default: cpu)")
    parser.add_argument("--replay", type=int, nargs="+", default=None, help="run only these case numbers")
    parser.add_argument("--cpu-path", choices=["fused", "tch", "cuda-emulator"], default="fused",
                        help="which code CPU tensors take: the fused kernels, the tch path (the CUDA "
                             "fallback) or the CUDA kernels on the emulator (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if hlora.backend() != "rust":
        parser.error("the native backend is not active: the campaign would check the reference against itself")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _use_cpu_path(args.cpu_path)
    print(f"hlora {hlora.__version__} backend={hlora.backend()} device={device} cpu-path={args.cpu_path} "
          f"seed={args.seed}")
    try:
        return _campaign(args, device)
    finally:
        _use_cpu_path("fused")


def _use_cpu_path(path: str) -> None:
    from hlora import _native

    if path != "cuda-emulator":
        _native.set_cpu_path(path)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import cuda_emulator  # scripts/cuda_emulator.py: builds it with g++

    _native.set_cpu_path(path, emulator=str(cuda_emulator.build(Path(tempfile.mkdtemp(prefix="hlora-emulator-")))))


def _campaign(args: argparse.Namespace, device: torch.device) -> int:
    worst: Dict[str, Tuple[float, float, int]] = {}
    counts: Dict[str, int] = defaultdict(int)
    failures: List[Tuple[int, str, float, float]] = []
    numbers = iter(args.replay) if args.replay else None
    deadline, number = time.monotonic() + args.seconds, 0
    while True:
        if numbers is not None:
            number = next(numbers, -1)
            if number < 0:
                break
        elif time.monotonic() > deadline:
            break
        for name, err, tol in run_case(args.seed, number, device).results:
            counts[name] += 1
            ratio = err / tol if tol else math.inf
            if ratio >= worst.get(name, (-1.0, 0.0, 0))[0]:
                worst[name] = (ratio, err, number)
            if not err <= tol:  # NaN fails too
                failures.append((number, name, err, tol))
        number += 1
    print(f"{'op/dtype':34s} {'cases':>7s} {'worst error':>12s} {'/ tolerance':>12s}  case")
    for name in sorted(worst):
        ratio, err, at = worst[name]
        print(f"{name:34s} {counts[name]:7d} {err:12.2e} {ratio:12.2f}  {at}")
    path = "" if args.cpu_path == "fused" else f" --cpu-path {args.cpu_path}"
    for number, name, err, tol in failures[:50]:
        print(f"FAILED case {number}: {name}: error {err:.3e} > tolerance {tol:.1e} "
              f"(python scripts/contract_fuzz.py --seed {args.seed}{path} --replay {number})")
    print(f"{sum(counts.values())} checks, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
