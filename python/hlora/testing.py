"""Helpers for checking hlora in your own test suite, in the style of ``torch.testing``: random
LoRA cases of the shapes, dtypes and devices you use, and a comparison of any op with
:mod:`hlora.reference` evaluated in float64 at the documented tolerances.

    from hlora.testing import assert_matches_reference, random_lora_case

    def test_penalty_on_my_shapes():
        case = random_lora_case(4096, 4096, 16, dtype=torch.bfloat16, device="cuda", seed=0)
        assert_matches_reference("importance_penalty", case)   # value and both gradients

Tolerances are on the relative error ‖x − ref‖ / ‖ref‖ against the reference evaluated in float64
on the same inputs (:data:`FORWARD_TOL`, :data:`GRAD_TOL`); a failure names the op, the dtype, the
relative error and the worst element with its index and both values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from hlora import ops, reference

__all__ = ["LoraCase", "random_lora_case", "assert_matches_reference", "FORWARD_TOL", "GRAD_TOL", "OPS"]

#: ‖x − ref‖/‖ref‖ of a result against the float64 reference on the same inputs, by factor dtype:
#: float64 factors get float64 maths; every other dtype gets float32 maths (bfloat16 and float16
#: values are exact in float32).
FORWARD_TOL: Dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-5,
    torch.float16: 1e-5,
}
#: The same for the penalty's gradients, which come back in the factors' dtype: bfloat16 and
#: float16 round them (about 4e-3 and 5e-4 of each entry).
GRAD_TOL: Dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}

#: The ops :func:`assert_matches_reference` knows; the ``_many`` ones take a list of cases.
OPS = ("accumulate_omega_", "finalize_importance", "importance_penalty", "layer_coefficients",
       "accumulate_omega_many_", "finalize_importance_many", "importance_penalty_many")


@dataclass
class LoraCase:
    """One adapted matrix with everything the ops take: an optimizer step (factors before and
    after, their gradients, the learning rate), the running ω it updates, the importance Ω the
    penalty reads, current factors and reference factors, and the scalings and ξ.

    A: (r, in), B: (out, r); ω and Ω are float32 (float64 for float64 factors)."""

    omega: torch.Tensor
    a_prev: torch.Tensor
    b_prev: torch.Tensor
    grad_a: torch.Tensor
    grad_b: torch.Tensor
    a_next: torch.Tensor
    b_next: torch.Tensor
    Omega: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    a_ref: torch.Tensor
    b_ref: torch.Tensor
    lr: float = 8e-4
    scaling: float = 2.0
    scaling_ref: float = 2.0
    xi: float = 1e-3

    @property
    def dtype(self) -> torch.dtype:
        """The factors' dtype."""
        return self.a.dtype

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(out, in, r)."""
        return (self.b.shape[0], self.a.shape[1], self.a.shape[0])

    def to(self, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device, None] = None) -> LoraCase:
        """The same case with factors (and, for float64, ω and Ω) in ``dtype`` on ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                is_omega = f.name in ("omega", "Omega")
                target = dtype if not is_omega or dtype is None else _accumulator_dtype(dtype)
                value = value.to(device=device, dtype=target)
            moved[f.name] = value
        return replace(self, **moved)


def _accumulator_dtype(factor_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if factor_dtype == torch.float64 else torch.float32


def random_lora_case(out: int, in_: int, r: int, *, dtype: torch.dtype = torch.float32,
                     device: Union[str, torch.device] = "cpu", seed: int = 0, step_size: float = 1e-2,
                     lr: float = 8e-4, scaling: float = 2.0, xi: float = 1e-3) -> LoraCase:
    """A random case at a realistic scale: factors ~0.1, gradients ~0.5, an optimizer step of
    ``step_size`` relative (small, so the update's change is a difference of nearly equal
    products — where a naive float32 formula cancels), ω of one update's magnitude, Ω ≥ 0 (as
    finalization leaves it) and current factors near the reference ones (as during domain
    fine-tuning). Values are drawn in float64 on the CPU from ``seed`` and then cast, so the same
    seed gives the same case on every device and in every dtype, up to the cast."""
    for name, n in (("out", out), ("in_", in_), ("r", r)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    if dtype not in FORWARD_TOL:
        raise TypeError(f"dtype must be one of {list(FORWARD_TOL)}, got {dtype}")
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    a_prev, b_prev = rnd(r, in_, scale=0.1), rnd(out, r, scale=0.1)
    grad_a, grad_b = rnd(r, in_, scale=0.5), rnd(out, r, scale=0.5)
    a_next, b_next = a_prev + step_size * rnd(r, in_, scale=0.1), b_prev + step_size * rnd(out, r, scale=0.1)
    omega = rnd(out, in_) * 1e-4
    big_omega = rnd(out, in_).abs() * 1e2
    a_ref, b_ref = a_next, b_next
    a, b = a_ref + 0.05 * rnd(r, in_, scale=0.1), b_ref + 0.05 * rnd(out, r, scale=0.1)
    case = LoraCase(omega, a_prev, b_prev, grad_a, grad_b, a_next, b_next, big_omega, a, b, a_ref, b_ref,
                    lr=lr, scaling=scaling, scaling_ref=scaling, xi=xi)
    return case.to(dtype, device)


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(torch.float64, copy=True)


def _describe(x: torch.Tensor) -> str:
    return f"{str(x.dtype).replace('torch.', '')}, {x.device}"


def _compare(op: str, what: str, got: torch.Tensor, want: torch.Tensor, tol: float, atol: float,
             dtype: torch.dtype) -> None:
    """Fails when ‖got − want‖ > atol + tol·‖want‖, naming the worst element."""
    got_d, want_d = got.detach().to("cpu", torch.float64), want.detach().to("cpu", torch.float64)
    if got_d.shape != want_d.shape:
        raise AssertionError(f"{op} ({str(dtype).replace('torch.', '')} factors): {what} has shape "
                             f"{tuple(got_d.shape)}, the reference {tuple(want_d.shape)}")
    diff = got_d - want_d
    err, scale = float(torch.linalg.vector_norm(diff)), float(torch.linalg.vector_norm(want_d))
    finite = bool(torch.isfinite(got_d).all())
    if finite and err <= atol + tol * scale:
        return
    flat = diff.abs().reshape(-1)
    flat = torch.where(torch.isnan(flat), torch.full_like(flat, float("inf")), flat)
    worst = int(flat.argmax()) if flat.numel() else 0
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), got_d.shape)) if got_d.dim() else ()
    g, w = (float(got_d.reshape(-1)[worst]), float(want_d.reshape(-1)[worst])) if got_d.numel() else (0.0, 0.0)
    rel = err / scale if scale > 0 else float("inf")
    raise AssertionError(
        f"{op} ({str(dtype).replace('torch.', '')} factors, {_describe(got)}): {what} differs from "
        f"hlora.reference in float64 by {rel:.3g} relative (tolerance {tol:.3g}"
        f"{f' + {atol:.3g} absolute' if atol else ''}); worst element at index {index}: got {g!r}, "
        f"reference {w!r}" + ("" if finite else "; the result is not finite"))


def _tolerances(dtype: torch.dtype, atol: Optional[float], rtol: Optional[float]) -> Tuple[float, float, float]:
    """(forward rtol, gradient rtol, atol) for factors of ``dtype``."""
    forward = FORWARD_TOL[dtype] if rtol is None else float(rtol)
    grads = GRAD_TOL[dtype] if rtol is None else float(rtol)
    return forward, grads, 0.0 if atol is None else float(atol)


def _penalty_args(case: LoraCase, **kw) -> Dict:
    return dict(scaling=case.scaling, scaling_ref=case.scaling_ref, **kw)


def _check_one(op: str, case: LoraCase, fwd: float, grad_tol: float, atol: float) -> None:
    dtype = case.dtype
    if op == "accumulate_omega_":
        step = (case.a_prev, case.b_prev, case.grad_a, case.grad_b, case.a_next, case.b_next)
        got = case.omega.clone()
        ops.accumulate_omega_(got, *step, lr=case.lr, scaling=case.scaling)
        want = reference.accumulate_omega_(_f64(case.omega), *map(_f64, step), lr=case.lr, scaling=case.scaling)
        _compare(op, "ω after the update", got, want, fwd, atol, dtype)
        _compare(op, "the update ω_after − ω_before", got.double() - case.omega.double(),
                 want - _f64(case.omega), 10 * fwd, atol, dtype)
    elif op == "finalize_importance":
        kw = dict(scaling=case.scaling, xi=case.xi, a_start=case.a_prev, b_start=case.b_prev)
        got = ops.finalize_importance(case.omega, case.a_next, case.b_next, **kw)
        want = reference.finalize_importance(_f64(case.omega), _f64(case.a_next), _f64(case.b_next),
                                             scaling=case.scaling, xi=case.xi, a_start=_f64(case.a_prev),
                                             b_start=_f64(case.b_prev))
        _compare(op, "Ω", got, want, fwd, atol, dtype)
    elif op == "importance_penalty":
        a, b = case.a.detach().clone().requires_grad_(), case.b.detach().clone().requires_grad_()
        value = ops.importance_penalty(case.Omega, a, b, case.a_ref, case.b_ref, **_penalty_args(case))
        value.backward()
        a64, b64 = _f64(case.a).requires_grad_(), _f64(case.b).requires_grad_()
        want = reference.importance_penalty(_f64(case.Omega), a64, b64, _f64(case.a_ref), _f64(case.b_ref),
                                            **_penalty_args(case))
        want.backward()
        _compare(op, "the value P", value, want, fwd, atol, dtype)
        _compare(op, "∂P/∂a", a.grad, a64.grad, grad_tol, atol, dtype)
        _compare(op, "∂P/∂b", b.grad, b64.grad, grad_tol, atol, dtype)
    else:  # layer_coefficients, of Ω's row norms standing in for per-matrix norms, at T = their mean
        norms = torch.linalg.vector_norm(case.Omega.double(), dim=1).to(dtype)
        temperature = float(norms.double().mean()) or 1.0
        got = ops.layer_coefficients(norms, temperature=temperature)
        want = reference.layer_coefficients(_f64(norms), temperature=temperature)
        _compare(op, "the coefficients", got, want, fwd, atol, dtype)


def _check_many(op: str, cases: Sequence[LoraCase], fwd: float, grad_tol: float, atol: float,
                dtype: torch.dtype) -> None:
    def lists(*names: str, f: Callable = lambda t: t) -> List[List[torch.Tensor]]:
        return [[f(getattr(c, n)) for c in cases] for n in names]

    scalings = [c.scaling for c in cases]
    if op == "accumulate_omega_many_":
        got = [c.omega.clone() for c in cases]
        step = lists("a_prev", "b_prev", "grad_a", "grad_b", "a_next", "b_next")
        ops.accumulate_omega_many_(got, *step, lr=cases[0].lr, scaling=scalings)
        want = [_f64(c.omega) for c in cases]
        reference.accumulate_omega_many_(want, *lists("a_prev", "b_prev", "grad_a", "grad_b", "a_next", "b_next",
                                                      f=_f64), lr=cases[0].lr, scaling=scalings)
        for i, (x, y) in enumerate(zip(got, want)):
            _compare(op, f"ω[{i}] after the update", x, y, fwd, atol, dtype)
    elif op == "finalize_importance_many":
        got, norms = ops.finalize_importance_many(*lists("omega", "a_next", "b_next", "a_prev", "b_prev"),
                                                  scaling=scalings, xi=cases[0].xi)
        want, want_norms = reference.finalize_importance_many(
            *lists("omega", "a_next", "b_next", "a_prev", "b_prev", f=_f64), scaling=scalings, xi=cases[0].xi)
        for i, (x, y) in enumerate(zip(got, want)):
            _compare(op, f"Ω[{i}]", x, y, fwd, atol, dtype)
        _compare(op, "the norms ‖Ω_l‖", norms, want_norms, fwd, atol, dtype)
    else:  # importance_penalty_many, with weights of one sign (a layer-coefficient-like spread)
        weights = [1.0 + i / len(cases) for i in range(len(cases))]
        a = [c.a.detach().clone().requires_grad_() for c in cases]
        b = [c.b.detach().clone().requires_grad_() for c in cases]
        kw = dict(scaling=scalings, scaling_ref=[c.scaling_ref for c in cases], weights=weights)
        value = ops.importance_penalty_many(lists("Omega")[0], a, b, *lists("a_ref", "b_ref"), **kw)
        value.backward()
        a64 = [_f64(c.a).requires_grad_() for c in cases]
        b64 = [_f64(c.b).requires_grad_() for c in cases]
        want = reference.importance_penalty_many(lists("Omega", f=_f64)[0], a64, b64,
                                                 *lists("a_ref", "b_ref", f=_f64), **kw)
        want.backward()
        _compare(op, "the value Σ w·P", value, want, fwd, atol, dtype)
        for i in range(len(cases)):
            _compare(op, f"∂/∂a[{i}]", a[i].grad, a64[i].grad, grad_tol, atol, dtype)
            _compare(op, f"∂/∂b[{i}]", b[i].grad, b64[i].grad, grad_tol, atol, dtype)


def assert_matches_reference(op_name: str, case: Union[LoraCase, Sequence[LoraCase]], *,
                             atol: Optional[float] = None, rtol: Optional[float] = None) -> None:
    """Runs ``hlora.ops.<op_name>`` on ``case`` and :mod:`hlora.reference`'s twin on float64
    copies of the same inputs, and raises ``AssertionError`` unless every result — the value and,
    for the penalty, both gradients — is within tolerance: ‖x − ref‖ ≤ atol + rtol·‖ref‖, with
    rtol from :data:`FORWARD_TOL` / :data:`GRAD_TOL` for the case's factor dtype unless given
    (atol: 0). The ``_many`` ops take a list of cases (one per matrix, one dtype and device).
    Inputs are not modified (the in-place ω update runs on a copy)."""
    if op_name not in OPS:
        raise ValueError(f"op_name must be one of {OPS}, got {op_name!r}")
    many = op_name.endswith(("_many", "_many_"))
    cases = list(case) if many and isinstance(case, (list, tuple)) else case
    if many:
        if not isinstance(cases, list) or not cases or not all(isinstance(c, LoraCase) for c in cases):
            raise TypeError(f"{op_name} takes a non-empty list of LoraCase (one per matrix), got {type(case).__name__}")
        dtypes = {c.dtype for c in cases}
        if len(dtypes) != 1:
            raise ValueError(f"the cases of one {op_name} call must share a factor dtype, "
                             f"got {sorted(map(str, dtypes))}")
        dtype = cases[0].dtype
        _check_many(op_name, cases, *_tolerances(dtype, atol, rtol), dtype)
    else:
        if not isinstance(case, LoraCase):
            raise TypeError("case must be an hlora.testing.LoraCase (random_lora_case(...)), "
                            f"got {type(case).__name__}")
        _check_one(op_name, case, *_tolerances(case.dtype, atol, rtol))
