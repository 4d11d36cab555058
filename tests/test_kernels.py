"""The four ops against hlora.reference evaluated in float64 on the same inputs: forward,
gradients, in-place semantics, odd shapes, every factor dtype, both CPU paths, NumPy inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hlora
from hlora import ops, reference

from conftest import FACTOR_DTYPES, FORWARD_TOL, GRAD_TOL, Step, cancelling_omega, make_step, rel_err

SHAPES = [(1, 1, 1), (7, 5, 3), (13, 1, 2), (1, 17, 4), (33, 65, 1), (40, 24, 64), (130, 129, 8),
          (576, 576, 8), (192, 576, 8)]
LARGE = (3072, 1024, 8)


def _ref_update(step, lr, s, clamp=False):
    ref = step.f64()
    reference.accumulate_omega_(*ref.args(), lr=lr, scaling=s, clamp_negative=clamp)
    return ref.omega


@pytest.mark.parametrize("shape", SHAPES + [LARGE], ids=str)
@pytest.mark.parametrize("dtype", FACTOR_DTYPES, ids=str)
def test_accumulate_matches_reference(shape, dtype, cpu_path):
    out, inn, r = shape
    step = make_step(out, inn, r, dtype, seed=out * 31 + inn)
    before = step.omega.clone()
    lr, s = 3e-3, 2.0
    want = _ref_update(step, lr, s)
    ptr, version = step.omega.data_ptr(), step.omega._version
    result = ops.accumulate_omega_(*step.args(), lr=lr, scaling=s)
    assert result is step.omega and step.omega.data_ptr() == ptr
    assert step.omega._version > version, "in-place write must bump the version counter"
    tol = FORWARD_TOL[dtype]
    assert rel_err(step.omega, want) <= tol
    # The increment itself (what the kernel adds), not only ω, matches.
    assert rel_err(step.omega.double() - before.double(), want - before.double()) <= tol * 10


@pytest.mark.parametrize("dtype", FACTOR_DTYPES, ids=str)
def test_accumulate_clamps_negative_running_omega(dtype, cpu_path):
    step = make_step(50, 70, 4, dtype, seed=3)
    want = _ref_update(step, 1e-3, 1.5, clamp=True)
    ops.accumulate_omega_(*step.args(), lr=1e-3, scaling=1.5, clamp_negative=True)
    assert (step.omega >= 0).all() and (step.omega > 0).any()
    assert rel_err(step.omega, want) <= FORWARD_TOL[dtype]


def test_update_is_cancellation_free_for_tiny_steps():
    """A step of 1e-6 relative: B1·A1 − B0·A0 in float32 loses everything; the kernel's form
    keeps 1e-5 accuracy."""
    step = make_step(64, 96, 8, torch.float32, seed=5, step_size=1e-6)
    step.omega.mul_(1e-8)
    want = _ref_update(step, 1e-3, 2.0)
    ops.accumulate_omega_(*step.args(), lr=1e-3, scaling=2.0)
    assert rel_err(step.omega, want) <= 1e-5
    naive = step.f64()
    f32 = [t.float() for t in (naive.a0, naive.b0, naive.a1, naive.b1)]
    d_naive = 2.0 * (f32[3] @ f32[2] - f32[1] @ f32[0])
    d_exact = 2.0 * (naive.b1 @ naive.a1 - naive.b0 @ naive.a0)
    assert rel_err(d_naive, d_exact) > 1e-3, "the naive form should have cancelled (test is meaningful)"


@pytest.mark.parametrize("shape", SHAPES + [LARGE], ids=str)
@pytest.mark.parametrize("dtype", FACTOR_DTYPES, ids=str)
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "continued"])
def test_finalize_matches_reference(shape, dtype, fresh, cpu_path):
    out, inn, r = shape
    step = make_step(out, inn, r, dtype, seed=inn)
    step.omega.normal_(generator=torch.Generator().manual_seed(1))  # mixed signs
    omega_before = step.omega.clone()
    start = {} if fresh else {"a_start": step.a0, "b_start": step.b0}
    start64 = {k: v.double() for k, v in start.items()}
    for clamp in (True, False):
        got = ops.finalize_importance(step.omega, step.a1, step.b1, scaling=1.7, xi=1e-3,
                                      clamp_negative=clamp, **start)
        want = reference.finalize_importance(step.omega.double(), step.a1.double(), step.b1.double(),
                                             scaling=1.7, xi=1e-3, clamp_negative=clamp, **start64)
        assert got.dtype == step.omega.dtype and got.shape == step.omega.shape
        assert got.data_ptr() != step.omega.data_ptr()
        assert rel_err(got, want) <= FORWARD_TOL[dtype]
        if clamp:
            assert (got >= 0).all()
    assert torch.equal(step.omega, omega_before), "finalize must leave ω unchanged"


@pytest.mark.parametrize("xi", [1e-6, 1e-9], ids=["xi=1e-6", "xi=1e-9"])
@pytest.mark.parametrize("dtype", FACTOR_DTYPES, ids=str)
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "continued"])
def test_finalize_is_accurate_at_small_xi(xi, dtype, fresh, cpu_path):
    """Ω = ω/(Δ² + ξ) magnifies Δ's rounding where Δ² ≲ ξ, and with a small ξ (the authors' code
    uses 1e-9) those entries dominate ‖Ω‖: Δ in float32 errs there by ~1e-4 of ‖Ω‖ (so does the
    float32 reference). The kernels form Δ in float64, so the contract's 1e-5 holds."""
    step = make_step(192, 576, 8, dtype, seed=5)
    omega = step.omega.abs() + 1e-4
    start = {} if fresh else {"a_start": step.a0, "b_start": step.b0}
    start64 = {k: v.double() for k, v in start.items()}
    got = ops.finalize_importance(omega, step.a1, step.b1, scaling=2.0, xi=xi, **start)
    want = reference.finalize_importance(omega.double(), step.a1.double(), step.b1.double(), scaling=2.0,
                                         xi=xi, **start64)
    assert got.dtype == omega.dtype
    assert rel_err(got, want) <= FORWARD_TOL[dtype]
    if dtype == torch.float32 and fresh and xi == 1e-9:
        # The case is a hard one: float32 maths misses the tolerance here.
        f32 = reference.finalize_importance(omega, step.a1, step.b1, scaling=2.0, xi=xi)
        assert rel_err(f32, want) > FORWARD_TOL[dtype]


@pytest.mark.parametrize("mode", ["softmax", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_layer_coefficients(mode, dtype, cpu_path):
    norms = (torch.rand(37, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 50).to(dtype)
    for t in (1.0, 7.5, 1e8):
        got = ops.layer_coefficients(norms, mode=mode, temperature=t)
        want = reference.layer_coefficients(norms.double(), mode=mode, temperature=t)
        assert got.shape == (37,) and got.dtype == dtype
        assert rel_err(got, want) <= FORWARD_TOL[dtype]
        assert abs(float(got.double().sum()) - 1.0) < 1e-6
    # Raw norms in the thousands with T=1 would overflow a naive exp: still finite, one-hot.
    huge = torch.tensor([1e4, 2e4, 3e4], dtype=dtype)
    c = ops.layer_coefficients(huge, mode="softmax", temperature=1.0)
    assert torch.isfinite(c).all()
    if mode == "softmax":
        assert float(c[2]) == pytest.approx(1.0)


@pytest.mark.parametrize("shape", SHAPES + [LARGE], ids=str)
@pytest.mark.parametrize("dtype", FACTOR_DTYPES, ids=str)
@pytest.mark.parametrize("ref_kind", ["none", "same_scaling", "other_scaling"])
def test_penalty_forward_and_gradients(shape, dtype, ref_kind, cpu_path):
    out, inn, r = shape
    step = make_step(out, inn, r, dtype, seed=out + 7 * r)
    omega = torch.rand(out, inn, generator=torch.Generator().manual_seed(9), dtype=torch.float64).float()
    a = step.a1.clone().requires_grad_()
    b = step.b1.clone().requires_grad_()
    refs = {"none": {}, "same_scaling": {"a_ref": step.a0, "b_ref": step.b0},
            "other_scaling": {"a_ref": step.a0, "b_ref": step.b0, "scaling_ref": 0.7}}[ref_kind]
    value = ops.importance_penalty(omega, a, b, scaling=1.3, **refs)
    value.backward()
    a64 = step.a1.double().requires_grad_()
    b64 = step.b1.double().requires_grad_()
    refs64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in refs.items()}
    want = reference.importance_penalty(omega.double(), a64, b64, scaling=1.3, **refs64)
    want.backward()
    assert value.dim() == 0
    assert rel_err(value, want) <= FORWARD_TOL[dtype]
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    assert float(a.grad.double().abs().sum()) > 0 and float(b.grad.double().abs().sum()) > 0
    assert rel_err(a.grad, a64.grad) <= GRAD_TOL[dtype]
    assert rel_err(b.grad, b64.grad) <= GRAD_TOL[dtype]


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each |x| (float64), subnormals included."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(x.abs().clamp_min(info.tiny)))
    return torch.maximum(torch.exp2(exponent) * info.eps, torch.tensor(info.tiny * info.eps, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 1, 3), (96, 1, 1), (7, 5, 2)], ids=str)
def test_low_precision_gradients_are_the_exact_ones_rounded(shape, dtype, cpu_path):
    """Gradients of float16/bfloat16 factors come back in that dtype (autograd casts them), so
    their relative error can only be held to DESIGN's 1e-2 where they are normal numbers; below
    float16's normal range (6e-5) it is the format's own rounding. Every entry is checked to one
    unit in the last place of the exact (float64) gradient, whatever its magnitude."""
    out, inn, r = shape
    g = torch.Generator().manual_seed(out * 31 + r)
    a0 = (torch.randn(r, inn, generator=g, dtype=torch.float64) * 0.02).to(dtype)
    b0 = (torch.randn(out, r, generator=g, dtype=torch.float64) * 0.02).to(dtype)
    omega = torch.rand(out, inn, generator=g, dtype=torch.float64).float()
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    ops.importance_penalty(omega, a, b, scaling=0.5).backward()
    a64, b64 = a0.double().requires_grad_(), b0.double().requires_grad_()
    reference.importance_penalty(omega.double(), a64, b64, scaling=0.5).backward()
    assert bool((b64.grad.abs() < 6e-5).any()), "the case reaches below float16's normal range"
    for got, want in ((a.grad, a64.grad), (b.grad, b64.grad)):
        assert got.dtype == dtype
        assert bool(((got.double() - want).abs() <= _ulp(want, dtype)).all()), (got, want)


@pytest.mark.parametrize("dtype", FACTOR_DTYPES, ids=str)
@pytest.mark.parametrize("ratio", [1 + 1e-6, 1 + 1e-3], ids=["s_ref=s(1+1e-6)", "s_ref=s(1+1e-3)"])
def test_penalty_has_no_cancellation_when_scalings_nearly_agree(dtype, ratio, cpu_path):
    """Factors a small step from their reference and scalings nearly equal: s·B·A − s_ref·B_ref·A_ref
    written as it stands is a difference of nearly equal products, which float32 loses 5e-4 of
    (the float32 reference too). The kernels use (s·B − s_ref·B_ref)·A + s_ref·B_ref·(A − A_ref),
    the first factor formed in float64."""
    step = make_step(192, 576, 8, dtype, seed=4, step_size=1e-4)
    omega = torch.rand(192, 576, generator=torch.Generator().manual_seed(9))
    refs = {"a_ref": step.a0, "b_ref": step.b0, "scaling_ref": 2.0 * ratio}
    a, b = step.a1.clone().requires_grad_(), step.b1.clone().requires_grad_()
    value = ops.importance_penalty(omega, a, b, scaling=2.0, **refs)
    value.backward()
    a64, b64 = step.a1.double().requires_grad_(), step.b1.double().requires_grad_()
    refs64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in refs.items()}
    want = reference.importance_penalty(omega.double(), a64, b64, scaling=2.0, **refs64)
    want.backward()
    assert rel_err(value, want) <= FORWARD_TOL[dtype]
    assert rel_err(a.grad, a64.grad) <= GRAD_TOL[dtype]
    assert rel_err(b.grad, b64.grad) <= GRAD_TOL[dtype]
    if dtype == torch.float32:  # the case is a hard one: the plain float32 formula misses
        a32, b32 = step.a1.clone().requires_grad_(), step.b1.clone().requires_grad_()
        reference.importance_penalty(omega, a32, b32, scaling=2.0, **refs).backward()
        assert rel_err(a32.grad, a64.grad) > GRAD_TOL[dtype]


def test_float64_penalty_with_nearly_equal_scalings_is_exact_to_float64(cpu_path):
    """float64 factors 1e-7 from their reference, s_ref = s·(1 + 1e-8): s·B − s_ref·B_ref formed as
    written keeps both products' roundings, ~1e-9 of their difference and the same along each row
    of D, so P errs by ~1e-11 (found by scripts/contract_fuzz.py). The kernels form it as
    s·(B − B_ref) + (s − s_ref)·B_ref, whose differences are exact. Checked against long double."""
    g = torch.Generator().manual_seed(2)
    out, inn, r, s = 64, 127, 7, 1.6053614289943658
    s_ref = s * (1 + 1e-8)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    a_ref, b_ref = rnd(r, inn), rnd(out, r)
    a, b = a_ref + 1e-7 * rnd(r, inn), b_ref + 1e-7 * rnd(out, r)
    omega = torch.rand(out, inn, generator=g, dtype=torch.float64) * 300
    fa, fb, fa_ref, fb_ref, om = (t.numpy().astype(np.longdouble) for t in (a, b, a_ref, b_ref, omega))
    d = (s * (fb - fb_ref) + (np.longdouble(s) - np.longdouble(s_ref)) * fb_ref) @ fa + s_ref * (fb_ref @ (fa - fa_ref))
    want_p, want_ga, want_gb = (om * d * d).sum(), 2 * s * (fb.T @ (om * d)), 2 * s * ((om * d) @ fa.T)

    def err(x, exact) -> float:
        x = x.detach().numpy().astype(np.longdouble) if isinstance(x, torch.Tensor) else np.longdouble(x)
        return float(np.linalg.norm(np.atleast_1d(x - exact).astype(np.float64))
                     / np.linalg.norm(np.atleast_1d(exact).astype(np.float64)))

    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    p = ops.importance_penalty(omega, a_, b_, a_ref, b_ref, scaling=s, scaling_ref=s_ref)
    p.backward()
    assert err(float(p.detach()), want_p) <= 1e-13
    assert err(a_.grad, want_ga) <= 1e-13 and err(b_.grad, want_gb) <= 1e-13
    # the form as written, in float64, misses by far more: the case is a hard one
    written = (s * b - s_ref * b_ref) @ a + s_ref * (b_ref @ (a - a_ref))
    assert err(float((omega * written**2).sum()), want_p) > 1e-12


@pytest.mark.parametrize("ref", [False, True])
def test_penalty_gradcheck(ref, cpu_path):
    g = torch.Generator().manual_seed(4)
    omega = torch.rand(6, 5, generator=g, dtype=torch.float64)
    a = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    a_ref, b_ref = (torch.randn(3, 5, generator=g, dtype=torch.float64),
                    torch.randn(6, 3, generator=g, dtype=torch.float64)) if ref else (None, None)
    fn = lambda a_, b_: ops.importance_penalty(omega, a_, b_, a_ref, b_ref, scaling=0.9)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("scaling_ref", [None, 1.2])
@pytest.mark.parametrize("many", [False, True])
def test_penalty_second_derivatives_match_the_reference(many, scaling_ref, cpu_path):
    """The kernel's gradients are constants; under create_graph=True they are recomputed as
    differentiable ops, so a Hessian-vector product through the penalty is right — not a silent
    zero hidden inside a larger loss."""
    step = make_step(12, 10, 3, torch.float64, seed=11)
    omega = torch.rand(12, 10, dtype=torch.float64)
    refs = dict(scaling=1.5, scaling_ref=scaling_ref)

    def total(impl, a_, b_):
        task = (a_.sin().sum() + b_.cos().sum()) ** 2  # has second derivatives of its own
        if many and impl is ops:
            p = ops.importance_penalty_many([omega, omega], [a_, a_], [b_, b_], [step.a0] * 2, [step.b0] * 2,
                                            weights=[2.0, 0.5], **{k: v for k, v in refs.items() if v is not None})
        else:
            p = 2.5 * impl.importance_penalty(omega, a_, b_, step.a0, step.b0, **refs)
        return task + p

    vecs = (torch.randn_like(step.a1), torch.randn_like(step.b1))
    hvps = []
    for impl in (ops, reference):
        a, b = step.a1.clone().requires_grad_(), step.b1.clone().requires_grad_()
        grads = torch.autograd.grad(total(impl, a, b), (a, b), create_graph=True)
        hvps.append(torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vecs)), (a, b)))
    for got, want in zip(*hvps):
        assert rel_err(got, want) <= 1e-12
    a, b = step.a1.clone().requires_grad_(), step.b1.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a_, b_: total(ops, a_, b_), (a, b), eps=1e-6, atol=1e-7)


def test_penalty_scales_with_upstream_gradient_and_skips_unneeded_grads():
    step = make_step(20, 30, 4, torch.float32, seed=8)
    omega = torch.rand(20, 30)
    a = step.a1.clone().requires_grad_()
    (3.0 * ops.importance_penalty(omega, a, step.b1, step.a0, step.b0, scaling=2.0)).backward()
    a2 = step.a1.double().requires_grad_()
    (3.0 * reference.importance_penalty(omega.double(), a2, step.b1.double(), step.a0.double(),
                                        step.b0.double(), scaling=2.0)).backward()
    assert rel_err(a.grad, a2.grad) <= 1e-5
    with torch.no_grad():
        v = ops.importance_penalty(omega, a, step.b1, scaling=2.0)
    assert not v.requires_grad


@pytest.mark.parametrize("omega_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_penalty_reads_stored_omega_dtypes(omega_dtype, cpu_path):
    step = make_step(33, 47, 4, torch.float32, seed=12)
    omega = torch.rand(33, 47).to(omega_dtype)
    a = step.a1.clone().requires_grad_()
    value = ops.importance_penalty(omega, a, step.b1, step.a0, step.b0, scaling=1.0)
    value.backward()
    a64 = step.a1.double().requires_grad_()
    want = reference.importance_penalty(omega.double(), a64, step.b1.double(), step.a0.double(),
                                        step.b0.double(), scaling=1.0)
    want.backward()
    tol = 1e-12 if omega_dtype == torch.float64 else 1e-5
    if omega_dtype == torch.float64:
        tol = 1e-5  # float32 factors: the maths still runs in float64, the factors were float32
    assert rel_err(value, want) <= tol
    assert rel_err(a.grad, a64.grad) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(192, 576, 8), (37, 29, 3)], ids=str)
def test_penalty_value_is_accurate_when_signed_terms_cancel(shape, dtype, cpu_path):
    """With Ω ≥ 0 every term is positive and float32 maths meets 1e-5. With mixed signs the
    error is relative to Σ|Ω|·D², which can be 1e4·|P|: the fused kernel sees the negative Ω
    per tile and sums such a value again with float64 maths; the CUDA kernels form D in
    float64 in blocks with a negative Ω; the tch path checks Ω's minimum first."""
    out, inn, r = shape
    step = make_step(out, inn, r, dtype, seed=out + r)
    d64 = reference._delta(step.a1.double(), step.b1.double(), 1.7, step.a0.double(), step.b0.double(), 1.7)
    omega = cancelling_omega(d64, 1e4, seed=r)
    magnitude = float((omega.double().abs() * d64**2).sum())
    a, b = step.a1.clone().requires_grad_(), step.b1.clone().requires_grad_()
    value = ops.importance_penalty(omega, a, b, step.a0, step.b0, scaling=1.7)
    value.backward()
    a64, b64 = step.a1.double().requires_grad_(), step.b1.double().requires_grad_()
    want = reference.importance_penalty(omega.double(), a64, b64, step.a0.double(), step.b0.double(), scaling=1.7)
    want.backward()
    assert magnitude > 1e3 * abs(float(want.detach())), "the case must cancel"
    assert rel_err(value, want) <= FORWARD_TOL[dtype]
    assert rel_err(a.grad, a64.grad) <= GRAD_TOL[dtype]
    assert rel_err(b.grad, b64.grad) <= GRAD_TOL[dtype]


def test_penalty_value_is_accurate_when_whole_tiles_of_signs_cancel(cpu_path):
    """Ω ≥ 0 in the first 64 rows (whole tiles, where a tile-local check sees no negative entry)
    and < 0 below, the two parts cancelling to 1e-4 of their size: the CUDA kernel that adds up
    the tiles' values sees that those summed from float32 D exceed 4·|P| and sums them again in
    double."""
    step = make_step(192, 300, 8, torch.float32, seed=5)
    d64 = reference._delta(step.a1.double(), step.b1.double(), 1.3, step.a0.double(), step.b0.double(), 1.3)
    omega = cancelling_omega(d64, 1e4, seed=6, negative_from_row=64)
    value = ops.importance_penalty(omega, step.a1, step.b1, step.a0, step.b0, scaling=1.3)
    want = reference.importance_penalty(omega.double(), step.a1.double(), step.b1.double(), step.a0.double(),
                                        step.b0.double(), scaling=1.3)
    assert float((omega.double().abs() * d64**2).sum()) > 1e3 * abs(float(want)), "the case must cancel"
    assert rel_err(value, want) <= FORWARD_TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("r", [8, 64])
def test_penalty_of_a_single_element_is_accurate_when_d_cancels(r, dtype, cpu_path):
    """(1, 1): P = Ω·D² with D = s·Σ_k B_k·A_k, whose terms here cancel to a small fraction of
    their size. At one element D's float32 rounding is the whole error (1e-3 relative at r = 64
    in one random case of 300), so matrices this small run their maths in float64."""
    g = torch.Generator().manual_seed(r)
    a = torch.randn(r, 1, generator=g, dtype=torch.float64)
    b = torch.randn(1, r, generator=g, dtype=torch.float64)
    b[0, -1] = -float(b[0, :-1] @ a[:-1, 0]) / float(a[-1, 0]) * (1 - 1e-4)
    a, b = a.to(dtype), b.to(dtype)
    terms = b.double()[0] * a.double()[:, 0]
    assert float(terms.abs().sum()) > 100 * abs(float(terms.sum())), "the case must cancel"
    omega = torch.tensor([[0.7]])
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    value = ops.importance_penalty(omega, a1, b1, scaling=1.7)
    value.backward()
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    want = reference.importance_penalty(omega.double(), a64, b64, scaling=1.7)
    want.backward()
    assert value.dtype == torch.float32 and a1.grad.dtype == dtype
    assert rel_err(value, want) <= FORWARD_TOL[dtype]
    assert rel_err(a1.grad, a64.grad) <= GRAD_TOL[dtype]
    assert rel_err(b1.grad, b64.grad) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("negative", ["weight", "omega"])
def test_penalty_many_total_is_accurate_when_matrices_cancel(negative, cpu_path):
    """Σ w_l·P_l whose two terms nearly cancel — by a negative weight, or (positive weights) by
    the second matrix's Ω ≤ 0. Every P_l is accurate to 1e-7 of itself, the total is not: the
    fused path sums such totals again in float64, as does the CUDA kernel that adds up the
    tiles' values; the tch path (weights and Ω's signs known before) forms every D in float64."""
    steps = _many_inputs(torch.float32, n=2, seed=40)
    omegas = [torch.rand(s.omega.shape, generator=torch.Generator().manual_seed(k)) for k, s in enumerate(steps)]
    args = ([s.a1 for s in steps], [s.b1 for s in steps], [s.a0 for s in steps], [s.b0 for s in steps])
    args64 = tuple([t.double() for t in col] for col in args)
    parts = [float(reference.importance_penalty(o.double(), *(c[k] for c in args64), scaling=1.5))
             for k, o in enumerate(omegas)]
    ratio = (parts[0] / parts[1]) * (1 - 1e-5)  # total ≈ 1e-5 of each term
    if negative == "weight":
        weights = [1.0, -ratio]
    else:
        weights, omegas[1] = [1.0, 1.0], -ratio * omegas[1]
    total = ops.importance_penalty_many(omegas, *args, scaling=1.5, weights=weights)
    want = reference.importance_penalty_many([o.double() for o in omegas], *args64, scaling=1.5, weights=weights)
    assert abs(float(want)) < 1e-4 * parts[0]
    assert rel_err(total, want) <= FORWARD_TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_update_of_a_single_element_is_accurate_when_g_tilde_cancels(dtype, cpu_path):
    """(1, 1) with r = 1: g~ = s·(gB·A0 + B0·gA − η·gB·gA) with gB·A0 ≈ −B0·gA. The kernels fold
    η into A0 − η·gA, whose float32 rounding the cancellation magnifies — at one element that is
    the whole norm, so matrices this small run their maths in float64."""
    eps = torch.finfo(dtype).eps
    one = lambda x: torch.tensor([[x]], dtype=torch.float64).to(dtype)  # noqa: E731
    a0, b0, gb, ga = one(1.0), one(0.75), one(1.0), one(-(1 - eps) / 0.75)
    a1, b1 = one(1.0 + 64 * eps), one(0.75 - 32 * eps)
    lr, s = 1.3e-3 * eps, 2.0
    step = Step(torch.tensor([[3e-3 * eps**2]]), a0, b0, ga, gb, a1, b1)
    before = step.omega.clone()
    want = _ref_update(step, lr, s)
    ops.accumulate_omega_(*step.args(), lr=lr, scaling=s)
    increment = want - before.double()
    assert abs(float(increment)) > 0.1 * float(before)  # the update shows in ω
    assert rel_err(step.omega.double() - before.double(), increment) <= FORWARD_TOL[dtype]


def _many_inputs(dtype, n=4, seed=0):
    shapes = [(17, 9, 2), (576, 576, 8), (1, 1, 1), (40, 3, 5)][:n]
    return [make_step(o, i, r, dtype, seed=seed + k) for k, (o, i, r) in enumerate(shapes)]


@pytest.mark.parametrize("dtype", FACTOR_DTYPES, ids=str)
def test_accumulate_many_equals_one_by_one(dtype, cpu_path):
    steps = _many_inputs(dtype)
    scalings = [1.0, 2.0, 0.5, 4.0]
    wants = [_ref_update(s, 2e-3, sc) for s, sc in zip(steps, scalings)]
    cols = list(zip(*(s.args() for s in steps)))
    result = ops.accumulate_omega_many_(*[list(c) for c in cols], lr=2e-3, scaling=scalings)
    assert [t.data_ptr() for t in result] == [s.omega.data_ptr() for s in steps]
    for s, w in zip(steps, wants):
        assert rel_err(s.omega, w) <= FORWARD_TOL[dtype]


@pytest.mark.parametrize("dtype", FACTOR_DTYPES, ids=str)
@pytest.mark.parametrize("with_ref", [False, True])
def test_penalty_many_is_weighted_sum(dtype, with_ref, cpu_path):
    steps = _many_inputs(dtype, seed=20)
    omegas = [torch.rand(s.omega.shape, generator=torch.Generator().manual_seed(k)) for k, s in enumerate(steps)]
    a = [s.a1.clone().requires_grad_() for s in steps]
    b = [s.b1.clone().requires_grad_() for s in steps]
    weights = [0.1, 0.2, 0.3, 0.4]
    refs = {"a_ref": [s.a0 for s in steps], "b_ref": [s.b0 for s in steps]} if with_ref else {}
    total = ops.importance_penalty_many(omegas, a, b, scaling=[1.0, 2.0, 1.0, 0.5], weights=weights, **refs)
    total.backward()
    a64 = [s.a1.double().requires_grad_() for s in steps]
    b64 = [s.b1.double().requires_grad_() for s in steps]
    refs64 = {k: [t.double() for t in v] for k, v in refs.items()}
    want = reference.importance_penalty_many([o.double() for o in omegas], a64, b64,
                                             scaling=[1.0, 2.0, 1.0, 0.5], weights=weights, **refs64)
    want.backward()
    assert rel_err(total, want) <= FORWARD_TOL[dtype]
    for x, y in zip(a + b, a64 + b64):
        assert rel_err(x.grad, y.grad) <= GRAD_TOL[dtype]


def test_gradients_scaled_together_equal_the_per_factor_ones():
    """The GPU backward of importance_penalty_many scales and casts all factors' gradients as one
    tensor per group (ops._scaled_together); it must give each factor exactly grad_out * g cast
    to its dtype, as the per-factor path does. Checked here on CPU tensors (the maths is the
    same ops on any device), with mixed dtypes, a gradient not asked for, and grad_out != 1."""
    gen = torch.Generator().manual_seed(31)
    shapes = [(8, 16), (16, 8), (1, 1), (3, 577), (577, 3)]
    grads = [torch.randn(s, generator=gen) for s in shapes] + [torch.randn(4, 4, generator=gen).double(), None]
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16, torch.float64,
              torch.float32]
    grad_out = torch.tensor(0.7310585786)
    got = ops._scaled_together(grads, grad_out, dtypes)
    assert got[-1] is None
    for g, dtype, x in zip(grads[:-1], dtypes, got[:-1]):
        want = (grad_out * g).to(dtype)
        assert x.dtype == dtype and x.shape == g.shape and x.is_contiguous()
        assert torch.equal(x, want)


def test_non_contiguous_inputs_give_correct_results(cpu_path):
    step = make_step(30, 40, 4, torch.float32, seed=6)
    want = _ref_update(step, 1e-3, 2.0)
    # ω as a transposed view of a (40, 30) buffer, factors as strided views.
    omega_t = step.omega.t().contiguous().t()
    assert not omega_t.is_contiguous()
    a0 = torch.stack([step.a0, step.a0], dim=-1)[..., 0]
    assert not a0.is_contiguous()
    ops.accumulate_omega_(omega_t, a0, step.b0, step.ga, step.gb, step.a1, step.b1, lr=1e-3, scaling=2.0)
    assert rel_err(omega_t, want) <= 1e-5
    value = ops.importance_penalty(omega_t.abs(), step.a1, step.b1, a0, step.b0, scaling=1.0)
    want_p = reference.importance_penalty(omega_t.abs().double(), step.a1.double(), step.b1.double(),
                                          step.a0.double(), step.b0.double(), scaling=1.0)
    assert rel_err(value, want_p) <= 1e-5


def test_numpy_arrays_zero_copy():
    step = make_step(25, 31, 3, torch.float32, seed=10)
    want = _ref_update(step, 1e-3, 2.0)
    arrays = [t.numpy().copy() for t in step.args()]
    omega_np = arrays[0]
    ops.accumulate_omega_(*arrays, lr=1e-3, scaling=2.0)
    assert rel_err(torch.from_numpy(omega_np), want) <= 1e-5
    fin = ops.finalize_importance(omega_np, arrays[5], arrays[6], scaling=2.0, xi=1e-3)
    assert isinstance(fin, np.ndarray) and fin.dtype == np.float32
    want_fin = reference.finalize_importance(torch.from_numpy(omega_np).double(), step.a1.double(),
                                             step.b1.double(), scaling=2.0, xi=1e-3)
    assert rel_err(torch.from_numpy(fin), want_fin) <= 1e-5
    p = ops.importance_penalty(fin, arrays[5], arrays[6], arrays[1], arrays[2], scaling=2.0)
    want_p = reference.importance_penalty(torch.from_numpy(fin).double(), step.a1.double(), step.b1.double(),
                                          step.a0.double(), step.b0.double(), scaling=2.0)
    assert rel_err(torch.as_tensor(p), want_p) <= 1e-5
    c = ops.layer_coefficients(np.array([1.0, 2.0, 3.0]), temperature=1.0)
    assert isinstance(c, np.ndarray) and c.dtype == np.float64
    np.testing.assert_allclose(c, torch.softmax(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 0).numpy())


def test_penalty_is_deterministic():
    step = make_step(300, 200, 8, torch.float32, seed=14)
    omega = torch.rand(300, 200)
    results = []
    for _ in range(3):
        a = step.a1.clone().requires_grad_()
        ops.importance_penalty(omega, a, step.b1, step.a0, step.b0, scaling=1.0).backward()
        results.append(a.grad.clone())
    assert all(torch.equal(results[0], x) for x in results[1:])


def test_penalty_gradients_agree_across_thread_counts():
    # ∂P/∂A is summed over the tasks' partials, ~4 tasks per thread: 576 rows make 4, 8 and 12
    # tasks on 1, 2 and 3 threads. Only the last bits may differ.
    step = make_step(576, 200, 8, torch.float32, seed=15)
    omega = torch.rand(576, 200)
    threads_before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            a = step.a1.clone().requires_grad_()
            b = step.b1.clone().requires_grad_()
            ops.importance_penalty(omega, a, b, step.a0, step.b0, scaling=1.0).backward()
            grads.append((a.grad, b.grad))
    finally:
        torch.set_num_threads(threads_before)
    for ga, gb in grads[1:]:
        assert rel_err(ga, grads[0][0]) <= 1e-6 and rel_err(gb, grads[0][1]) <= 1e-6


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(out=st.integers(1, 40), inn=st.integers(1, 40), r=st.one_of(st.integers(1, 9), st.just(64)),
       dtype=st.sampled_from(FACTOR_DTYPES), seed=st.integers(0, 2**31 - 1),
       lr=st.floats(0.0, 0.1), s=st.floats(0.05, 8.0))
def test_property_all_ops_match_reference(out, inn, r, dtype, seed, lr, s, cpu_path):
    """Every path (the fixture only picks the path: one setting for all examples)."""
    step = make_step(out, inn, r, dtype, seed=seed)
    want = _ref_update(step, lr, s)
    ops.accumulate_omega_(*step.args(), lr=lr, scaling=s)
    tol = FORWARD_TOL[dtype]
    assert rel_err(step.omega, want) <= tol
    fin = ops.finalize_importance(step.omega, step.a1, step.b1, scaling=s, xi=1e-4,
                                  a_start=step.a0, b_start=step.b0, clamp_negative=False)
    want_fin = reference.finalize_importance(step.omega.double(), step.a1.double(), step.b1.double(),
                                             scaling=s, xi=1e-4, a_start=step.a0.double(),
                                             b_start=step.b0.double(), clamp_negative=False)
    assert rel_err(fin, want_fin) <= tol
    for omega in (fin.abs(), fin):  # Ω ≥ 0, then signed (clamp="none"): its terms can cancel
        a, b = step.a1.clone().requires_grad_(), step.b1.clone().requires_grad_()
        p = ops.importance_penalty(omega, a, b, step.a0, step.b0, scaling=s)
        p.backward()
        a64, b64 = (t.to(torch.float64, copy=True).requires_grad_() for t in (step.a1, step.b1))
        want_p = reference.importance_penalty(omega.double(), a64, b64, step.a0.double(), step.b0.double(), scaling=s)
        want_p.backward()
        if float(want_p.detach()) != 0:
            assert rel_err(p, want_p) <= tol
        for got, want in ((a.grad, a64.grad), (b.grad, b64.grad)):
            # Plus the format's own rounding where gradients fall below its normal range
            # (float16: 6e-5; a finalized Ω can be that small).
            info = torch.finfo(dtype)
            floor = 0.5 * info.tiny * info.eps * got.numel() ** 0.5  # half the subnormal spacing
            assert float((got.double() - want).norm()) <= GRAD_TOL[dtype] * float(want.norm()) + floor


def test_backend_reports_rust_with_native_module():
    assert hlora.backend() in ("rust", "torch")
    if hlora.backend() == "rust":
        from hlora import _native

        assert _native.torch_version() == torch.__version__.split("+")[0]
        assert _native.num_threads() >= 1


def test_plain_variant_and_rayon_pool_match_reference_too():
    """The kernels are compiled three times (baseline x86-64, AVX2+FMA, AVX-512) and run on
    torch's OpenMP team when torch uses libgomp; this machine runs its best variant on the team.
    The others — what a CPU without AVX2 runs, with the rayon pool a torch without libgomp (or a
    forked child) uses, and AVX2 where the CPU has AVX-512 — go through the same kernel tests in
    subprocesses pinned to them with HLORA_SIMD (and HLORA_POOL=rayon)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if hlora.backend() != "rust":
        pytest.skip("the SIMD variants and thread pools are the native backend's")
    from hlora import _native

    pinned = os.environ.get("HLORA_SIMD")
    if pinned in ("plain", "avx2"):  # inside a subprocess below
        assert _native.simd_level() == pinned
        assert _native.cpu_threading() == ("rayon" if pinned == "plain" else "openmp")
        return
    best = _native.simd_level()
    assert best in ("avx512", "avx2", "plain")
    assert _native.cpu_threading() == "openmp"  # torch 2.11's Linux wheels link libgomp
    here = Path(__file__)
    select = "fused and (matches_reference or penalty_forward or gradcheck or many or plain_variant)"
    variants = [{"HLORA_SIMD": "plain", "HLORA_POOL": "rayon"}] + ([{"HLORA_SIMD": "avx2"}] if best == "avx512" else [])
    for variant in variants:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here), "-k", select],
                             env={**os.environ, **variant}, cwd=here.parent, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, f"{variant}: " + run.stdout[-3000:] + run.stderr[-3000:]
        assert " passed" in run.stdout and "failed" not in run.stdout
