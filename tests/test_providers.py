"""The two providers that read torch tensors for the kernels — tch (libtorch 2.11.0, in builds
made against it) and view (any torch: the tensor's attributes through Python) — refuse the same
inputs by name and compute the same results, on what a data pointer alone does not say."""

from __future__ import annotations

import pytest
import torch

import hlora
from hlora import _loader, ops, reference

from conftest import make_step, rel_err

pytestmark = pytest.mark.skipif(hlora.backend() != "rust", reason="the providers are the native module's")
PROVIDERS = hlora.backend_info()["providers"] or ["view"]


@pytest.fixture(params=PROVIDERS)
def provider(request):
    before = hlora.backend_info()["provider"]
    _loader.set_provider(request.param)
    yield request.param
    _loader.set_provider(before)


class _Dispatching(torch.Tensor):
    """A subclass that reinterprets its memory through torch's dispatch, as DTensor and FakeTensor do."""

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _LooksLikeATensor:
    shape = (2, 5)
    dtype = torch.float32

    def data_ptr(self) -> int:
        return 4096


def _args():
    return list(make_step(6, 5, 2, torch.float32, seed=4).args())


def _update(args):
    return ops.accumulate_omega_(*args, lr=1e-3, scaling=1.0)


@pytest.mark.parametrize("case, error, message", [
    ("an object with data_ptr", TypeError, "a_prev must be a torch.Tensor or numpy.ndarray, got _LooksLikeATensor"),
    ("negative bit", ValueError, "a_prev has torch's negation bit set"),
    ("conjugate", TypeError, "a_prev is a conjugate view of a complex tensor"),
    ("sparse", TypeError, "a_prev must be a dense \\(strided\\) tensor, got layout torch.sparse_coo"),
    ("nested", TypeError, "a_prev is a nested tensor"),
    ("dispatching subclass", TypeError, "a_prev is a _Dispatching, a tensor subclass whose memory does not hold"),
    ("mkldnn", TypeError, "a_prev must be a dense \\(strided\\) tensor, got layout torch._mkldnn"),
])
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_what_a_data_pointer_does_not_say_is_refused_by_name(provider, case, error, message):
    args = _args()
    a = args[1]
    args[1] = {
        "an object with data_ptr": lambda: _LooksLikeATensor(),
        "negative bit": lambda: torch._neg_view(a),
        "conjugate": lambda: a.to(torch.complex64).conj(),
        "sparse": lambda: a.to_sparse(),
        "nested": lambda: torch.nested.nested_tensor([a, a]),
        "dispatching subclass": lambda: a.as_subclass(_Dispatching),
        "mkldnn": lambda: a.to_mkldnn(),
    }[case]()
    omega = args[0].clone()
    with pytest.raises(error, match=message):
        _update(args)
    assert torch.equal(args[0], omega)  # nothing was written


def test_an_expanded_omega_written_in_place_is_refused(provider):
    args = _args()
    args[0] = torch.zeros(1, 5).expand(6, 5)
    with pytest.raises(ValueError, match="omega is updated in place, but some of its elements share memory"):
        _update(args)


def test_storage_offsets_and_strided_layouts_give_the_reference_results(provider):
    # Every argument a view into a larger tensor (a storage offset), the factors transposed and
    # ω a column slice written in place: the results are the contiguous copies' results.
    args = _args()
    want = [t.double().clone() for t in args]
    reference.accumulate_omega_(*want, lr=1e-3, scaling=1.0)
    big = torch.zeros(9, 20)
    big[2:8, 3:8] = args[0]
    omega = big[2:8, 3:8]
    assert omega.storage_offset() > 0 and not omega.is_contiguous()
    shifted = []
    for t in args[1:]:
        holder = torch.zeros(t.shape[1] + 1, t.shape[0] + 2)
        holder[1:, 2:] = t.t()
        shifted.append(holder[1:, 2:].t())  # offset, transposed strides
    assert all(s.storage_offset() > 0 and not s.is_contiguous() for s in shifted)
    _update([omega, *shifted])
    assert rel_err(omega, want[0]) <= 1e-6
    assert torch.equal(big[:2], torch.zeros(2, 20)) and torch.equal(big[:, :3], torch.zeros(9, 3))  # only ω moved
    value = ops.importance_penalty(omega.abs(), shifted[0], shifted[1], scaling=2.0)
    assert rel_err(value, reference.importance_penalty(omega.abs().double(), *[t.double() for t in shifted[:2]],
                                                       scaling=2.0)) <= 1e-6


def test_tensors_that_require_grad_and_parameters_are_read_in_place(provider):
    args = _args()
    a = torch.nn.Parameter(args[1].clone())
    b = args[2].clone().requires_grad_()
    omega = torch.rand(6, 5)
    value = ops.importance_penalty(omega, a, b, args[5], args[6], scaling=2.0)
    value.backward()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    reference.importance_penalty(omega.double(), a64, b64, args[5].double(), args[6].double(), scaling=2.0).backward()
    assert rel_err(a.grad, a64.grad) <= 1e-5 and rel_err(b.grad, b64.grad) <= 1e-5


def test_both_providers_give_the_same_bits():
    if len(PROVIDERS) < 2:
        pytest.skip("this build has one provider")
    before = hlora.backend_info()["provider"]
    results = {}
    try:
        for name in PROVIDERS:
            _loader.set_provider(name)
            args = _args()
            _update(args)
            omegas, norms = ops.finalize_importance_many([args[0].abs()], [args[5]], [args[6]], scaling=2.0, xi=1e-3)
            a, b = args[1].clone().requires_grad_(), args[2].clone().requires_grad_()
            value = ops.importance_penalty_many(omegas, [a], [b], [args[5]], [args[6]], scaling=2.0, weights=[0.7])
            value.backward()
            results[name] = [args[0], omegas[0], norms, value.detach(), a.grad, b.grad]
    finally:
        _loader.set_provider(before)
    for x, y in zip(*results.values()):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def test_a_provider_the_build_lacks_is_refused_by_name():
    from hlora import _native

    with pytest.raises(ValueError, match='provider must be "view" or "tch"'):
        _native.set_provider("libtorch")
    if "tch" not in PROVIDERS:
        with pytest.raises(ValueError, match="built without the tch feature"):
            _native.set_provider("tch")
