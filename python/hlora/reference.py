"""The plain-PyTorch oracle: DESIGN §1 written for clarity, one matrix product per term.

Same signatures and dtype rules as :mod:`hlora.ops` (maths in float32, float64 when any input
is float64; the native kernels go further in two places, finalization's Δ and a penalty whose
scaling_ref differs from scaling, which they form partly in float64). Tests evaluate it on
float64 copies of their inputs as the ground truth; it is also the fallback backend. Autograd
provides the penalty's gradients.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from hlora import _checks as check

Scalars = Union[float, Sequence[float]]


def accumulate_omega_(
    omega: torch.Tensor,
    a_prev: torch.Tensor,
    b_prev: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    a_next: torch.Tensor,
    b_next: torch.Tensor,
    *,
    lr: float,
    scaling: float,
    clamp_negative: bool = False,
) -> torch.Tensor:
    """ω ← ω − g~ ⊙ dθ (Eq. 12), in place; returns ``omega``."""
    check.tensor(omega, "omega", check.OMEGA_DTYPES)
    named = [("a_prev", a_prev), ("b_prev", b_prev), ("grad_a", grad_a), ("grad_b", grad_b),
             ("a_next", a_next), ("b_next", b_next)]
    for name, t in named:
        check.tensor(t, name, check.FACTOR_DTYPES)
    out, inn, rank = check.factors("omega", omega, "a_prev", a_prev, "b_prev", b_prev)
    for name, t in (("grad_a", grad_a), ("a_next", a_next)):
        check.shape(t, name, rank, inn, "like a_prev (r, in)")
    for name, t in (("grad_b", grad_b), ("b_next", b_next)):
        check.shape(t, name, out, rank, "(out, r) for omega (out, in) and A (r, in)")
    check.same_device([("omega", omega), *named])
    check.disjoint([("omega", omega)], named)
    lr, s = check.finite(lr, "lr"), check.finite(scaling, "scaling")
    clamp_negative = check.flag(clamp_negative, "clamp_negative")
    dt = check.compute_dtype(omega, *(t for _, t in named))
    a0, b0, ga, gb, a1, b1 = (t.detach().to(dt) for _, t in named)
    with torch.no_grad():
        g_tilde = s * (gb @ a0 + b0 @ ga - lr * (gb @ ga))  # Eq. 11
        d_theta = s * ((b1 - b0) @ a1 + b0 @ (a1 - a0))  # = s·(B1·A1 − B0·A0)
        if omega.dtype == dt:
            omega.sub_(g_tilde * d_theta)
        else:
            omega.copy_(omega.to(dt) - g_tilde * d_theta)
        if clamp_negative:
            omega.clamp_min_(0.0)
    return omega


def _delta(a: torch.Tensor, b: torch.Tensor, s: float, a_ref: Optional[torch.Tensor],
           b_ref: Optional[torch.Tensor], s_ref: float) -> torch.Tensor:
    """s·B·A − s_ref·B_ref·A_ref, in the cancellation-free form when the scalings agree."""
    if a_ref is None:
        return s * (b @ a)
    if s == s_ref:
        return s * ((b - b_ref) @ a + b_ref @ (a - a_ref))
    return s * (b @ a) - s_ref * (b_ref @ a_ref)


def finalize_importance(
    omega: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    scaling: float,
    xi: float,
    clamp_negative: bool = True,
    a_start: Optional[torch.Tensor] = None,
    b_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Ω = ω / (Δ² + ξ) (Eq. 13), a new tensor of ω's dtype; ω is left unchanged."""
    dt = check.factor_set("omega", omega, check.OMEGA_DTYPES, a, b, ("a_start", "b_start"), (a_start, b_start))
    s = check.finite(scaling, "scaling")
    xi = check.finite(xi, "xi")
    clamp_negative = check.flag(clamp_negative, "clamp_negative")
    if xi <= 0:
        raise ValueError(f"xi must be a positive number, got {xi}")
    with torch.no_grad():
        cast = [None if t is None else t.detach().to(dt) for t in (a, b, a_start, b_start)]
        delta = _delta(cast[0], cast[1], s, cast[2], cast[3], s)
        result = omega.to(dt) / (delta.square() + xi)
        if clamp_negative:
            result = result.clamp_min(0.0)
        return result.to(omega.dtype)


def finalize_importance_many(omega, a, b, a_start=None, b_start=None, *, scaling: Scalars, xi: float,
                             clamp_negative: bool = True) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Ω for every matrix, and the Frobenius norms ‖Ω_l‖ (float64) the layer coefficients use."""
    n = _factor_lists("omega", omega, a, b, ("a_start", "b_start"), (a_start, b_start))
    scalings = _per_matrix(scaling, "scaling", n)
    results = [finalize_importance(omega[i], a[i], b[i], scaling=scalings[i], xi=xi, clamp_negative=clamp_negative,
                                   a_start=None if a_start is None else a_start[i],
                                   b_start=None if b_start is None else b_start[i]) for i in range(n)]
    norms = torch.stack([torch.linalg.vector_norm(r.double()) for r in results])
    return results, norms


def layer_coefficients(norms: torch.Tensor, *, mode: str = "softmax", temperature: float = 1.0) -> torch.Tensor:
    """c_l = softmax(‖Ω_l‖ / T) (Eq. 15, max-shifted) or 1/L (``mode="uniform"``)."""
    check.tensor(norms, "norms", check.FACTOR_DTYPES)
    if norms.dim() != 1 or norms.numel() == 0:
        raise ValueError(f"norms must be a non-empty 1-D tensor of per-matrix norms, got shape {list(norms.shape)}")
    x = norms.detach().double()
    if not torch.isfinite(x).all():
        raise ValueError("norms must be finite")
    if mode == "softmax":
        t = check.finite(temperature, "temperature")
        if t <= 0:
            raise ValueError(f"temperature must be positive, got {t}")
        c = torch.softmax(x / t, dim=0)
    elif mode == "uniform":
        c = torch.full_like(x, 1.0 / x.numel())
    else:
        raise ValueError(f'mode must be "softmax" or "uniform", got {mode!r}')
    return c.to(torch.float64 if norms.dtype == torch.float64 else torch.float32)


def importance_penalty(
    Omega: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    a_ref: Optional[torch.Tensor] = None,
    b_ref: Optional[torch.Tensor] = None,
    *,
    scaling: float,
    scaling_ref: Optional[float] = None,
) -> torch.Tensor:
    """P = Σ Ω ⊙ D² (Eq. 14), D = s·B·A − s_ref·B_ref·A_ref; differentiable w.r.t. a and b."""
    dt = check.factor_set("Omega", Omega, check.FACTOR_DTYPES, a, b, ("a_ref", "b_ref"), (a_ref, b_ref))
    s = check.finite(scaling, "scaling")
    s_ref = s if scaling_ref is None else check.finite(scaling_ref, "scaling_ref")
    refs = [None if t is None else t.detach().to(dt) for t in (a_ref, b_ref)]
    d = _delta(a.to(dt), b.to(dt), s, refs[0], refs[1], s_ref)
    return (Omega.detach().to(dt) * d * d).sum()


def _penalty_grads(Omega: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a_ref: Optional[torch.Tensor],
                   b_ref: Optional[torch.Tensor], scaling: float,
                   scaling_ref: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(∂P/∂A, ∂P/∂B) = (2s·Bᵀ·(Ω⊙D), 2s·(Ω⊙D)·Aᵀ) as differentiable torch ops (inputs already
    checked): what the fused penalty's backward uses when asked for second derivatives."""
    dt = check.compute_dtype(Omega, a, b, a_ref, b_ref)
    s = float(scaling)
    s_ref = s if scaling_ref is None else float(scaling_ref)
    refs = [None if t is None else t.detach().to(dt) for t in (a_ref, b_ref)]
    a_, b_ = a.to(dt), b.to(dt)
    g = Omega.detach().to(dt) * _delta(a_, b_, s, refs[0], refs[1], s_ref)
    return 2 * s * (b_.t() @ g), 2 * s * (g @ a_.t())


def _per_matrix(values: Optional[Scalars], name: str, n: int) -> Optional[List[float]]:
    if values is None:
        return None
    values = check.numbers(values, name)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values, expected 1 or {n} (one per matrix)")
    return values


def _lists(n: Optional[int], **named: object) -> int:
    for name, v in named.items():
        if not isinstance(v, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors")
        if n is None:
            n = len(v)
        elif len(v) != n:
            raise ValueError(f"{name} has {len(v)} entries, expected {n} (one per matrix)")
    return n or 0


def _factor_lists(omega_name: str, omega: object, a: object, b: object, pair_names: Tuple[str, str],
                  pair: Tuple[object, object]) -> int:
    """Checks the lists of a `_many` call (Ω/ω, A, B and an optional start/reference pair) and
    returns the matrix count."""
    n = _lists(None, **{omega_name: omega, "a": a, "b": b})
    if n == 0:
        raise ValueError(f"{omega_name} must hold at least one matrix")
    if check.pair_given(pair[0], pair[1], " and ".join(pair_names)):
        _lists(n, **dict(zip(pair_names, pair)))
    return n


def accumulate_omega_many_(omega, a_prev, b_prev, grad_a, grad_b, a_next, b_next, *, lr: float,
                           scaling: Scalars, clamp_negative: bool = False) -> list:
    """:func:`accumulate_omega_` over lists (one entry per adapted matrix)."""
    n = _lists(None, omega=omega, a_prev=a_prev, b_prev=b_prev, grad_a=grad_a, grad_b=grad_b,
               a_next=a_next, b_next=b_next)
    scalings = _per_matrix(scaling, "scaling", n)
    named = {"a_prev": a_prev, "b_prev": b_prev, "grad_a": grad_a, "grad_b": grad_b, "a_next": a_next,
             "b_next": b_next}
    check.disjoint([(f"omega[{i}]", t) for i, t in enumerate(omega)],
                   [(f"{name}[{i}]", t) for name, ts in named.items() for i, t in enumerate(ts)])
    for i in range(n):
        accumulate_omega_(omega[i], a_prev[i], b_prev[i], grad_a[i], grad_b[i], a_next[i], b_next[i],
                          lr=lr, scaling=scalings[i], clamp_negative=clamp_negative)
    return list(omega)


def importance_penalty_many(Omega, a, b, a_ref=None, b_ref=None, *, scaling: Scalars,
                            scaling_ref: Optional[Scalars] = None,
                            weights: Optional[Scalars] = None) -> torch.Tensor:
    """Σ_l w_l · P_l over lists of matrices (w_l = 1 unless given)."""
    n = _factor_lists("Omega", Omega, a, b, ("a_ref", "b_ref"), (a_ref, b_ref))
    scalings = _per_matrix(scaling, "scaling", n)
    refs = _per_matrix(scaling_ref, "scaling_ref", n) or [None] * n
    w = [check.finite(v, f"weights[{i}]") for i, v in enumerate(_per_matrix(weights, "weights", n) or [1.0] * n)]
    total = None
    for i in range(n):
        p = w[i] * importance_penalty(Omega[i], a[i], b[i], None if a_ref is None else a_ref[i],
                                      None if b_ref is None else b_ref[i], scaling=scalings[i],
                                      scaling_ref=refs[i])
        total = p if total is None else total + p
    return total
