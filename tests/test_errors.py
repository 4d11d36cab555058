"""Bad input gives a TypeError/ValueError naming the argument — on the native backend and on the
reference alike — never a crash or a silently wrong result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hlora import ops, reference

from conftest import make_step

IMPLS = [ops, reference]


def _step():
    return make_step(6, 5, 2, torch.float32, seed=1)


@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
@pytest.mark.parametrize("position,name", [(0, "omega"), (1, "a_prev"), (2, "b_prev"), (3, "grad_a"),
                                           (4, "grad_b"), (5, "a_next"), (6, "b_next")])
def test_accumulate_rejects_wrong_shapes(impl, position, name):
    args = list(_step().args())
    args[position] = torch.zeros(args[position].shape[0] + 1, args[position].shape[1] + 2)
    with pytest.raises(ValueError, match=name if position else "omega|a_prev"):
        impl.accumulate_omega_(*args, lr=1e-3, scaling=1.0)


@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
def test_accumulate_rejects_non_matrices_and_lists(impl):
    args = list(_step().args())
    bad = list(args)
    bad[1] = args[1].reshape(-1)
    with pytest.raises(ValueError, match="a_prev must be a 2-D matrix"):
        impl.accumulate_omega_(*bad, lr=1e-3, scaling=1.0)
    bad = list(args)
    bad[2] = args[2].tolist()
    with pytest.raises(TypeError, match="b_prev must be a torch.Tensor"):
        impl.accumulate_omega_(*bad, lr=1e-3, scaling=1.0)


@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool], ids=str)
def test_unsupported_dtypes_raise_type_error(impl, dtype):
    args = list(_step().args())
    args[3] = args[3].to(dtype)
    with pytest.raises(TypeError, match="grad_a must have dtype"):
        impl.accumulate_omega_(*args, lr=1e-3, scaling=1.0)
    args = list(_step().args())
    with pytest.raises(TypeError, match="omega must have dtype float64, float32"):
        impl.accumulate_omega_(args[0].to(torch.bfloat16), *args[1:], lr=1e-3, scaling=1.0)
    with pytest.raises(TypeError, match="Omega must have dtype"):
        impl.importance_penalty(args[0].to(dtype), args[5], args[6], scaling=1.0)


@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
def test_rank_mismatch_and_non_finite_scalars(impl):
    s = _step()
    with pytest.raises(ValueError, match="b_next must have shape"):
        impl.accumulate_omega_(s.omega, s.a0, s.b0, s.ga, s.gb, s.a1, torch.zeros(6, 3), lr=1e-3, scaling=1.0)
    for name, kwargs in (("lr", {"lr": float("nan"), "scaling": 1.0}),
                         ("scaling", {"lr": 1e-3, "scaling": float("inf")})):
        with pytest.raises(ValueError, match=name):
            impl.accumulate_omega_(*s.args(), **kwargs)


@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
def test_finalize_errors(impl):
    s = _step()
    with pytest.raises(ValueError, match="xi must be a positive"):
        impl.finalize_importance(s.omega, s.a1, s.b1, scaling=1.0, xi=0.0)
    with pytest.raises(ValueError, match="a_start and b_start must be given together"):
        impl.finalize_importance(s.omega, s.a1, s.b1, scaling=1.0, xi=1e-3, a_start=s.a0)
    with pytest.raises(ValueError, match="b_start must have shape"):
        impl.finalize_importance(s.omega, s.a1, s.b1, scaling=1.0, xi=1e-3, a_start=s.a0,
                                 b_start=torch.zeros(6, 4))
    with pytest.raises(ValueError, match="a must have shape"):
        impl.finalize_importance(s.omega, torch.zeros(2, 4), s.b1, scaling=1.0, xi=1e-3)


@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
def test_penalty_errors(impl):
    s = _step()
    omega = torch.rand(6, 5)
    with pytest.raises(ValueError, match="a_ref and b_ref must be given together"):
        impl.importance_penalty(omega, s.a1, s.b1, s.a0, None, scaling=1.0)
    with pytest.raises(ValueError, match="a_ref must have shape"):
        impl.importance_penalty(omega, s.a1, s.b1, torch.zeros(3, 5), s.b0, scaling=1.0)
    with pytest.raises(ValueError, match="b must have shape"):
        impl.importance_penalty(omega, s.a1, torch.zeros(6, 3), scaling=1.0)
    with pytest.raises(ValueError, match="Omega must be a 2-D matrix"):
        impl.importance_penalty(omega[0], s.a1, s.b1, scaling=1.0)


@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
def test_layer_coefficient_errors(impl):
    with pytest.raises(ValueError, match="non-empty 1-D"):
        impl.layer_coefficients(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        impl.layer_coefficients(torch.zeros(0))
    with pytest.raises(ValueError, match="temperature must be positive"):
        impl.layer_coefficients(torch.ones(3), temperature=0.0)
    with pytest.raises(ValueError, match="mode must be"):
        impl.layer_coefficients(torch.ones(3), mode="max")
    with pytest.raises(ValueError, match="finite"):
        impl.layer_coefficients(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
def test_many_variants_check_lists(impl):
    s = _step()
    cols = [[t] for t in s.args()]
    with pytest.raises(TypeError, match="a_prev must be a list or tuple"):
        impl.accumulate_omega_many_(cols[0], s.a0, *cols[2:], lr=1e-3, scaling=1.0)
    with pytest.raises(ValueError, match="entries, expected 1"):
        impl.accumulate_omega_many_(cols[0], cols[1] * 2, *cols[2:], lr=1e-3, scaling=1.0)
    with pytest.raises(ValueError, match="scaling has 3 values"):
        impl.accumulate_omega_many_(*[c * 2 for c in cols], lr=1e-3, scaling=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least one matrix"):
        impl.importance_penalty_many([], [], [], scaling=1.0)
    with pytest.raises(ValueError, match="entries"):
        impl.importance_penalty_many([torch.rand(6, 5)], [s.a1, s.a1], [s.b1], scaling=1.0)


@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
@pytest.mark.parametrize("bad", ["1.0", None, True, 1j, torch.ones(2), np.ones(2)], ids=repr)
def test_scalars_must_be_real_numbers(impl, bad):
    # float() would take "1.0" and True; a two-element array is not a scaling.
    s = _step()
    omega = torch.rand(6, 5)
    with pytest.raises(TypeError, match="scaling must be a number"):
        impl.importance_penalty(omega, s.a1, s.b1, scaling=bad)
    if bad is not None:  # (scaling_ref=None means "as scaling")
        with pytest.raises(TypeError, match="scaling_ref must be a number"):
            impl.importance_penalty(omega, s.a1, s.b1, s.a0, s.b0, scaling=1.0, scaling_ref=bad)
    with pytest.raises(TypeError, match="lr must be a number"):
        impl.accumulate_omega_(*s.args(), lr=bad, scaling=1.0)
    with pytest.raises(TypeError, match="xi must be a number"):
        impl.finalize_importance(s.omega, s.a1, s.b1, scaling=1.0, xi=bad)
    with pytest.raises(TypeError, match="temperature must be a number"):
        impl.layer_coefficients(torch.ones(3), temperature=bad)
    if not isinstance(bad, (torch.Tensor, np.ndarray)):  # (1-D arrays are per-matrix lists there)
        with pytest.raises(TypeError, match=r"weights(\[1\])? must be a number"):
            impl.importance_penalty_many([omega] * 2, [s.a1] * 2, [s.b1] * 2, scaling=1.0, weights=[1.0, bad])


@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
def test_scalars_take_numpy_and_one_element_tensors(impl):
    s = _step()
    omega = torch.rand(6, 5)
    want = reference.importance_penalty(omega, s.a1, s.b1, scaling=0.5)
    for x in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 1 / 2):
        torch.testing.assert_close(impl.importance_penalty(omega, s.a1, s.b1, scaling=x), want)
    many = impl.importance_penalty_many([omega] * 2, [s.a1] * 2, [s.b1] * 2, scaling=np.array([0.5, 0.25]),
                                        weights=torch.tensor([1.0, 2.0]))
    quarter = reference.importance_penalty(omega, s.a1, s.b1, scaling=0.25)
    torch.testing.assert_close(many, want + 2 * quarter)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
def test_sparse_tensors_are_refused_by_name(impl):
    s = _step()
    omega = torch.rand(6, 5)
    with pytest.raises(TypeError, match="Omega must be a dense"):
        impl.importance_penalty(omega.to_sparse(), s.a1, s.b1, scaling=1.0)
    with pytest.raises(TypeError, match="b must be a dense"):
        impl.importance_penalty(omega, s.a1, s.b1.to_sparse_csr(), scaling=1.0)
    args = list(s.args())
    args[0] = args[0].to_sparse()
    with pytest.raises(TypeError, match="omega must be a dense"):
        impl.accumulate_omega_(*args, lr=1e-3, scaling=1.0)


@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
def test_omega_may_not_share_memory_with_an_input(impl):
    # The update reads the factors while it writes ω: aliased memory would give a silently wrong ω.
    s = make_step(5, 5, 5, torch.float32, seed=2)
    args = list(s.args())
    with pytest.raises(ValueError, match="omega shares memory with a_next"):
        impl.accumulate_omega_(args[0], *args[1:5], args[0], args[6], lr=1e-3, scaling=1.0)
    # A view into the same buffer, overlapping part of it.
    flat = torch.rand(40)
    omega, grad_b = flat[:25].view(5, 5), flat[22:37].view(5, 3)
    s3 = make_step(5, 5, 3, torch.float32, seed=3)
    a3 = list(s3.args())
    with pytest.raises(ValueError, match="omega shares memory with grad_b"):
        impl.accumulate_omega_(omega, a3[1], a3[2], a3[3], grad_b, a3[5], a3[6], lr=1e-3, scaling=1.0)
    with pytest.raises(ValueError, match=r"omega\[0\] shares memory with omega\[1\]"):
        impl.accumulate_omega_many_(*[[t, t] for t in a3], lr=1e-3, scaling=1.0)


@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
@pytest.mark.parametrize("view", ["expanded rows", "overlapping rows", "interleaved"])
def test_an_omega_whose_elements_share_memory_is_refused_untouched(impl, view):
    # Updated through a contiguous copy, such an ω would be written back in no defined order (or,
    # expanded, fail with libtorch's message naming no argument).
    s = make_step(5, 6, 2, torch.float32, seed=4)
    buffer = torch.rand(64)
    omega = {"expanded rows": buffer[:6].expand(5, 6), "overlapping rows": buffer.as_strided((5, 6), (3, 1)),
             "interleaved": buffer.as_strided((5, 6), (1, 2))}[view]
    before = buffer.clone()
    with pytest.raises(ValueError, match=r"omega is updated in place, but some of its elements share memory"):
        impl.accumulate_omega_(omega, *s.args()[1:], lr=1e-3, scaling=1.0)
    with pytest.raises(ValueError, match=r"omega\[1\] is updated in place"):
        impl.accumulate_omega_many_([s.omega.clone(), omega], *[[t, t] for t in s.args()[1:]], lr=1e-3, scaling=1.0)
    assert torch.equal(buffer, before)
    # Strided views without a shared element (every other column, a transpose) are updated.
    for fine in (buffer.as_strided((5, 6), (12, 2)), buffer.as_strided((2, 3), (3, 2)), buffer[:30].view(6, 5).t()):
        out, inn = fine.shape
        t = make_step(out, inn, 2, torch.float32, seed=5)
        want = reference.accumulate_omega_(fine.clone(), *t.args()[1:], lr=1e-3, scaling=1.0)
        impl.accumulate_omega_(fine, *t.args()[1:], lr=1e-3, scaling=1.0)
        torch.testing.assert_close(fine, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
def test_omega_views_of_one_buffer_are_fine_when_disjoint(impl):
    # Contiguous slices of one flat buffer, and side-by-side column blocks (interleaved rows,
    # no shared element): no false alarm, and the same result as separate tensors.
    steps = [make_step(4, 6, 2, torch.float32, seed=k) for k in range(2)]
    lists = [[getattr(st, f) for st in steps] for f in ("a0", "b0", "ga", "gb", "a1", "b1")]
    want = [reference.accumulate_omega_(st.omega.clone(), *st.args()[1:], lr=1e-2, scaling=2.0) for st in steps]
    flat = torch.cat([st.omega.reshape(-1) for st in steps])
    impl.accumulate_omega_many_([flat[:24].view(4, 6), flat[24:].view(4, 6)], *lists, lr=1e-2, scaling=2.0)
    torch.testing.assert_close(flat, torch.cat([w.reshape(-1) for w in want]))
    wide = torch.cat([st.omega for st in steps], dim=1)
    impl.accumulate_omega_many_([wide[:, :6], wide[:, 6:]], *lists, lr=1e-2, scaling=2.0)
    torch.testing.assert_close(wide, torch.cat(want, dim=1))


@pytest.mark.parametrize("impl", IMPLS, ids=["ops", "reference"])
def test_meta_tensors_infer_shapes(impl):
    # Shape inference on the meta device: every data pointer is 0, which is no overlap, and the
    # penalty has no Ω values to scan for a sign (it once failed reading one back).
    omega, a0, b0, *_ = meta = [torch.empty(t.shape, device="meta") for t in _step().args()]
    assert impl.accumulate_omega_(*meta, lr=1e-3, scaling=1.0).shape == (6, 5)
    assert impl.finalize_importance(omega, a0, b0, scaling=1.0, xi=1e-3).shape == (6, 5)
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    penalty = impl.importance_penalty(omega, a, b, a0, b0, scaling=1.0)
    penalty.backward()
    assert penalty.shape == () and penalty.is_meta and a.grad.shape == a.shape and b.grad.is_meta
    assert impl.importance_penalty_many([omega], [a], [b], scaling=1.0, weights=[-1.0]).is_meta


def test_numpy_argument_errors_on_both_backends():
    s = _step()
    ro = s.omega.numpy().copy()
    ro.setflags(write=False)
    args = [t.numpy() for t in s.args()[1:]]
    with pytest.raises(ValueError, match="omega"):
        ops.accumulate_omega_(ro, *args, lr=1e-3, scaling=1.0)
    with pytest.raises(TypeError, match="float32 or float64 numpy array"):
        ops.accumulate_omega_(s.omega.numpy().astype(np.int32), *args, lr=1e-3, scaling=1.0)
    with pytest.raises(ValueError, match="negative or unaligned strides"):
        ops.finalize_importance(s.omega.numpy()[::-1], *args[4:], scaling=1.0, xi=1e-3)
    with pytest.raises(ValueError, match="omega"):
        ops.accumulate_omega_many_([ro], *[[x] for x in args], lr=1e-3, scaling=1.0)
    # Only ω is written: read-only factors are fine, and the update lands in ω.
    frozen = [x.copy() for x in args]
    for x in frozen:
        x.setflags(write=False)
    omega = s.omega.numpy().copy()
    before = omega.copy()
    ops.accumulate_omega_(omega, *frozen, lr=1e-3, scaling=1.0)
    assert not np.array_equal(omega, before)


def test_device_mismatch_is_reported():
    if not torch.cuda.is_available():
        # The meta device stands in for a second device: same check, no GPU needed.
        s = _step()
        with pytest.raises(ValueError, match=r"a_prev is on meta but omega is on cpu; all tensors must be on one "
                                             r"device"):
            ops.accumulate_omega_(s.omega, s.a0.to("meta"), *s.args()[2:], lr=1e-3, scaling=1.0)
    else:
        s = _step()
        with pytest.raises(ValueError, match="all tensors must be on one device"):
            ops.accumulate_omega_(s.omega, s.a0.cuda(), *s.args()[2:], lr=1e-3, scaling=1.0)


def test_torch_errors_are_one_clean_line(cpu_path):
    """Whatever torch raises inside the native path reaches Python as one line, no C++ trace."""
    s = _step()
    try:
        ops.accumulate_omega_(s.omega, s.a0.to("meta"), *s.args()[2:], lr=1e-3, scaling=1.0)
    except (ValueError, TypeError) as err:
        assert "\n" not in str(err) and "Exception raised from" not in str(err)
