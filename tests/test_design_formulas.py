"""DESIGN §1 written out literally — plain products in float64, on inputs where the naive forms
do not cancel — against both hlora.reference and the kernels (hlora.ops).

Every other kernel test compares the kernels with hlora.reference, so a convention both got
wrong the same way (a sign, where s goes, what a clamp applies to, which norm the softmax takes)
would pass them all. These tests pin the reference and the kernels to the design's formulas
themselves."""

from __future__ import annotations

import math

import pytest
import torch

from hlora import ops, reference

from conftest import rel_err

# (out, in, r): a single element, odd sizes, rank 1, rank above min(out, in).
SHAPES = [(1, 1, 1), (7, 5, 3), (1, 33, 1), (40, 24, 64), (65, 130, 8)]
IMPLEMENTATIONS = {"reference": reference, "kernels": ops}
TOL = 1e-12  # float64 factors (DESIGN §2); the inputs below are well conditioned


def _random(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _factors(out: int, inn: int, r: int, seed: int):
    """A, B and a second pair 30 % away from them: far enough that s·B·A − s·B'·A' does not
    cancel in float64, so the literal formula is exact to ~1e-15 here."""
    a, b = _random(seed, r, inn, scale=0.3), _random(seed + 1, out, r, scale=0.3)
    return a, b, a + _random(seed + 2, r, inn, scale=0.1), b + _random(seed + 3, out, r, scale=0.1)


@pytest.fixture(params=list(IMPLEMENTATIONS), ids=list(IMPLEMENTATIONS))
def impl(request):
    return IMPLEMENTATIONS[request.param]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("clamp", [False, True], ids=["signed", "clamped"])
def test_omega_update_is_eq_11_and_12(impl, shape, clamp):
    out, inn, r = shape
    a0, b0, a1, b1 = _factors(out, inn, r, seed=10)
    ga, gb = _random(20, r, inn, scale=0.5), _random(21, out, r, scale=0.5)
    s, lr = 1.7, 0.05
    omega = _random(22, out, inn, scale=1e-2)
    # g~ = s·(gB·A0 + B0·gA − η·gB·gA), dθ = s·(B1·A1 − B0·A0), ω ← ω − g~ ⊙ dθ
    g_tilde = s * (gb @ a0 + b0 @ ga - lr * gb @ ga)
    d_theta = s * (b1 @ a1 - b0 @ a0)
    want = omega - g_tilde * d_theta
    if clamp:
        want = want.clamp_min(0.0)
    got = impl.accumulate_omega_(omega.clone(), a0, b0, ga, gb, a1, b1, lr=lr, scaling=s, clamp_negative=clamp)
    assert rel_err(got, want) <= TOL
    if clamp and want.numel() > 1:
        assert (want == 0).any() and (want > 0).any(), "the clamp is exercised both ways"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("start", [False, True], ids=["fresh", "continued"])
@pytest.mark.parametrize("clamp", [True, False], ids=["clamped", "signed"])
def test_finalization_is_eq_13(impl, shape, start, clamp):
    out, inn, r = shape
    a_start, b_start, a, b = _factors(out, inn, r, seed=30)
    s, xi = 0.6, 1e-3
    omega = _random(31, out, inn, scale=1e-3)
    # Δ = s·B·A − s·B_start·A_start (s·B·A for a fresh adapter); Ω = ω / (Δ² + ξ), then max(·, 0)
    delta = s * (b @ a) - (s * (b_start @ a_start) if start else 0.0)
    want = omega / (delta * delta + xi)
    if clamp:
        want = want.clamp_min(0.0)
    before = omega.clone()
    starts = {"a_start": a_start, "b_start": b_start} if start else {}
    got = impl.finalize_importance(omega, a, b, scaling=s, xi=xi, clamp_negative=clamp, **starts)
    assert rel_err(got, want) <= TOL
    assert torch.equal(omega, before), "finalization leaves ω alone"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ref_kind", ["fresh", "same scaling", "own scaling"])
def test_penalty_and_its_gradients_are_eq_14(impl, shape, ref_kind):
    out, inn, r = shape
    a_ref, b_ref, a, b = _factors(out, inn, r, seed=40)
    s = 2.0
    s_ref = {"fresh": None, "same scaling": None, "own scaling": 1.25}[ref_kind]
    omega = _random(41, out, inn).abs()
    # D = s·B·A − s_ref·B_ref·A_ref (s·B·A without reference factors); P = Σ Ω ⊙ D²;
    # ∂P/∂B = 2s·(Ω⊙D)·Aᵀ, ∂P/∂A = 2s·Bᵀ·(Ω⊙D)
    d = s * (b @ a)
    if ref_kind != "fresh":
        d = d - (s if s_ref is None else s_ref) * (b_ref @ a_ref)
    want_p = (omega * d * d).sum()
    want_ga, want_gb = 2 * s * (b.t() @ (omega * d)), 2 * s * ((omega * d) @ a.t())
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    refs = (None, None) if ref_kind == "fresh" else (a_ref, b_ref)
    got = impl.importance_penalty(omega, a_, b_, *refs, scaling=s, scaling_ref=s_ref)
    assert got.dim() == 0
    # 0.7 upstream: the gradients scale with it
    (0.7 * got).backward()
    assert abs(float(got.detach()) - float(want_p)) <= TOL * float(want_p)
    assert rel_err(a_.grad, 0.7 * want_ga) <= TOL
    assert rel_err(b_.grad, 0.7 * want_gb) <= TOL


def test_layer_coefficients_are_eq_15(impl):
    norms = _random(50, 6).abs() * 3.0
    for t in (0.5, 1.0, 7.0):
        e = [math.exp(float(x) / t) for x in norms]
        want = torch.tensor([v / sum(e) for v in e], dtype=torch.float64)
        assert rel_err(impl.layer_coefficients(norms, temperature=t), want) <= TOL
    uniform = impl.layer_coefficients(norms, mode="uniform")
    assert torch.allclose(uniform, torch.full((6,), 1 / 6, dtype=torch.float64), rtol=0, atol=1e-15)


def test_many_ops_are_the_per_matrix_formulas_summed(impl):
    """Σ_l w_l·P_l for the penalty, ‖Ω_l‖_F for finalization's norms, per-matrix scalings."""
    shapes, scalings, weights, xi = [(7, 5, 3), (1, 33, 1), (40, 24, 8)], [2.0, 0.5, 1.3], [0.2, 1.0, 3.0], 1e-2
    pairs = [_factors(o, i, r, seed=60 + 4 * n) for n, (o, i, r) in enumerate(shapes)]
    omegas = [_random(70 + n, o, i).abs() for n, (o, i, _) in enumerate(shapes)]
    want_p = sum(w * (om * (s * (b @ a - b0 @ a0)) ** 2).sum()
                 for (a0, b0, a, b), om, s, w in zip(pairs, omegas, scalings, weights))
    got_p = impl.importance_penalty_many(omegas, [p[2] for p in pairs], [p[3] for p in pairs],
                                         [p[0] for p in pairs], [p[1] for p in pairs],
                                         scaling=scalings, weights=weights)
    assert abs(float(got_p) - float(want_p)) <= TOL * float(want_p)
    finals, norms = impl.finalize_importance_many(omegas, [p[2] for p in pairs], [p[3] for p in pairs],
                                                  scaling=scalings, xi=xi)
    for (_, _, a, b), om, s, got in zip(pairs, omegas, scalings, finals):
        assert rel_err(got, om / ((s * (b @ a)) ** 2 + xi)) <= TOL
    want_norms = torch.stack([torch.sqrt((f.double() ** 2).sum()) for f in finals])
    assert rel_err(norms, want_norms) <= TOL
