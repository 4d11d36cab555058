"""The fused CUDA kernels (src/cuda/kernels.cu): NVRTC compiles them on any machine; their CPU
emulator runs the same source here (the `cuda-emulator` path of the kernel tests, and the
many-matrix cases below); on a GPU the same checks run on the device, against
hlora.reference in float64, with the caching allocator poisoned (NaN) before every call."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import hlora
from hlora import ops, reference

from conftest import FACTOR_DTYPES, FORWARD_TOL, GRAD_TOL, make_step, rel_err, requires_cuda

native = pytest.importorskip("hlora._native")
pytestmark = pytest.mark.skipif(hlora.backend() != "rust", reason="native backend not active")


@pytest.mark.parametrize("arch", ["sm_90", pytest.param("sm_80", marks=pytest.mark.slow),
                                  pytest.param("sm_100", marks=pytest.mark.slow)])
def test_nvrtc_compiles_the_kernels_without_a_gpu(arch):
    # Also checks the host/device table layouts: kernels.cu static_asserts the host's sizes.
    assert native.cuda_compile(arch) > 100_000


@pytest.mark.slow
def test_compiled_kernels_are_cached_on_disk(tmp_path, monkeypatch):
    """First use compiles (~15 s) and stores the cubin; the next process loads it; a damaged file
    is recompiled and replaced; HLORA_CACHE_DIR=off compiles every time and writes nothing."""
    monkeypatch.setenv("HLORA_CACHE_DIR", str(tmp_path))
    size, origin, path = native.cuda_cubin("sm_90")
    assert (origin, size > 100_000) == ("compiled", True)
    assert path is not None and path.startswith(str(tmp_path)) and path.endswith(".cubin")
    cached = tmp_path / Path(path).name
    stored = cached.read_bytes()
    assert len(stored) == size + 32  # header: magic, key, length, checksum
    assert native.cuda_cubin("sm_90") == (size, "disk", path)
    # One flipped bit in the payload: detected, recompiled, rewritten whole.
    damaged = bytearray(stored)
    damaged[32 + size // 2] ^= 1
    cached.write_bytes(bytes(damaged))
    assert native.cuda_cubin("sm_90") == (size, "compiled", path)
    assert cached.read_bytes() == stored
    assert sorted(p.name for p in tmp_path.iterdir()) == [cached.name]  # no temporaries left
    monkeypatch.setenv("HLORA_CACHE_DIR", "off")
    assert native.cuda_cubin("sm_90") == (size, "compiled", None)
    with pytest.raises(ValueError, match="arch"):
        native.cuda_cubin("sm_90/../../x")


def test_compile_rejects_a_malformed_arch():
    with pytest.raises(ValueError, match="arch"):
        native.cuda_compile("hopper")


def test_tuning_defines_other_than_d_options_are_refused(monkeypatch):
    """HLORA_CUDA_DEFINES (kernel tuning knobs for timing variants) reaches NVRTC's options: only
    -DNAME=VALUE words, else a ValueError naming the variable, before NVRTC runs."""
    monkeypatch.setenv("HLORA_CUDA_DEFINES", "-DHL_OMEGA_MIN_BLOCKS=4 --use_fast_math")
    with pytest.raises(ValueError, match=r"HLORA_CUDA_DEFINES holds -DNAME=VALUE options only .*--use_fast_math"):
        native.cuda_compile("sm_90")


def test_cuda_path_switch_is_validated():
    with pytest.raises(ValueError, match="path"):
        native.set_cuda_path("fast")
    with pytest.raises(ValueError, match="emulator"):
        native.set_cpu_path("cuda-emulator")
    with pytest.raises(ValueError, match="emulator"):
        native.set_cpu_path("fused", emulator="/nonexistent.so")
    with pytest.raises(ValueError, match="cannot be loaded"):
        native.set_cpu_path("cuda-emulator", emulator="/nonexistent.so")
    assert native.cpu_path() == "fused"
    assert native.cuda_path() == "fused"


@pytest.fixture(params=["cuda-emulator", pytest.param("cuda", marks=requires_cuda)])
def device(request):
    """Where the fused CUDA kernels run: the CPU emulator (CPU tensors) or a GPU."""
    if request.param == "cuda-emulator":
        native.set_cpu_path("cuda-emulator", emulator=str(request.getfixturevalue("cuda_emulator")))
        yield "cpu"
        native.set_cpu_path("fused")
    else:
        assert native.cuda_status(torch.cuda.current_device()).startswith("fused"), \
            native.cuda_status(torch.cuda.current_device())
        yield "cuda"


def _poison(device: str) -> None:
    """Fills free cached GPU memory with NaN, so a kernel that skips writing an output shows."""
    if device == "cuda":
        junk = torch.full((64 << 20,), float("nan"), device=device)
        del junk


# 70 matrices: more than one launch's table (64), odd shapes, one empty, two dtype groups.
def _shapes():
    shapes = [(1 + (7 * k) % 67, 1 + (13 * k) % 150, 1 + k % 11) for k in range(69)]
    return shapes + [(0, 5, 2)]


def _steps(device, seed=0):
    # 68 float32 matrices (two launches) and 2 bfloat16 ones (a second dtype group).
    return [make_step(o, i, r, torch.bfloat16 if k < 2 else torch.float32, seed=seed + k, device=device)
            for k, (o, i, r) in enumerate(_shapes())]


def test_accumulate_many_spans_launches_and_dtype_groups(device):
    steps = _steps(device)
    want = [s.omega.double().clone() for s in steps]
    scalings = [0.5 + (k % 4) for k in range(len(steps))]
    for w, s, sc in zip(want, steps, scalings):
        reference.accumulate_omega_(w, *(t.double() for t in s.args()[1:]), lr=1e-3, scaling=sc)
    _poison(device)
    ops.accumulate_omega_many_(*[list(c) for c in zip(*(s.args() for s in steps))], lr=1e-3, scaling=scalings)
    for s, w in zip(steps, want):
        if w.numel():
            assert rel_err(s.omega, w) <= FORWARD_TOL[torch.float32]


def test_penalty_many_cancelling_across_launch_groups_stays_accurate(device):
    """Weights of both signs over matrices in three launches (two dtype groups), half the Ω
    signed, the total ~1e-5 of its terms: every block forms D in float64 for the values and the
    groups' totals are added in float64 (each in float32 would err by ~1e-2 here)."""
    steps = _steps(device, seed=300)
    g = torch.Generator().manual_seed(2)
    omegas = [(torch.randn if k % 2 else torch.rand)(s.omega.shape, generator=g).to(device)
              for k, s in enumerate(steps)]
    a64, b64 = [s.a1.double() for s in steps], [s.b1.double() for s in steps]
    parts = [float(reference.importance_penalty(o.double(), a, b, scaling=1.5)) for o, a, b in zip(omegas, a64, b64)]
    weights = [(-1.0) ** k for k in range(len(steps))]
    big = max(range(len(steps)), key=lambda k: abs(parts[k]))
    rest = sum(w * p for k, (w, p) in enumerate(zip(weights, parts)) if k != big)
    weights[big] = -rest / parts[big] * (1 - 1e-5)  # the total: ~1e-5 of the largest term
    _poison(device)
    total = ops.importance_penalty_many(omegas, [s.a1 for s in steps], [s.b1 for s in steps], scaling=1.5,
                                        weights=weights)
    want = reference.importance_penalty_many([o.double() for o in omegas], a64, b64, scaling=1.5, weights=weights)
    assert abs(float(want)) < 1e-4 * abs(parts[big] * weights[big]), "the case must cancel"
    assert rel_err(total, want) <= FORWARD_TOL[torch.float32]


def test_finalize_many_returns_norms_from_the_same_pass(device):
    steps = _steps(device, seed=100)
    args = dict(scaling=2.0, xi=1e-3)
    _poison(device)
    got, norms = ops.finalize_importance_many([s.omega for s in steps], [s.a1 for s in steps],
                                              [s.b1 for s in steps], [s.a0 for s in steps],
                                              [s.b0 for s in steps], **args)
    want, want_norms = reference.finalize_importance_many(
        [s.omega.double() for s in steps], [s.a1.double() for s in steps], [s.b1.double() for s in steps],
        [s.a0.double() for s in steps], [s.b0.double() for s in steps], **args)
    assert norms.dtype == torch.float64 and norms.shape == (len(steps),)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == torch.float32
        if w.numel():
            assert rel_err(g, w) <= FORWARD_TOL[torch.float32]
    assert rel_err(norms, want_norms) <= 1e-5
    assert float(norms[-1]) == 0.0  # the empty matrix


@pytest.mark.parametrize("with_ref", [False, True])
def test_penalty_many_spans_launches_and_dtype_groups(device, with_ref):
    steps = _steps(device, seed=200)
    g = torch.Generator().manual_seed(1)
    omegas = [torch.rand(s.omega.shape, generator=g).to(device) for s in steps]
    a = [s.a1.clone().requires_grad_() for s in steps]
    b = [s.b1.clone().requires_grad_() for s in steps]
    weights = [0.1 + 0.01 * k for k in range(len(steps))]
    scalings = [1.0 + (k % 3) for k in range(len(steps))]
    # Half the matrices measured from a reference at another scale (the third form of D).
    refs = {"a_ref": [s.a0 for s in steps], "b_ref": [s.b0 for s in steps],
            "scaling_ref": [sc if k % 2 else 0.75 * sc for k, sc in enumerate(scalings)]} if with_ref else {}
    _poison(device)
    total = ops.importance_penalty_many(omegas, a, b, scaling=scalings, weights=weights, **refs)
    total.backward()
    a64 = [s.a1.double().requires_grad_() for s in steps]
    b64 = [s.b1.double().requires_grad_() for s in steps]
    refs64 = {k: ([t.double() for t in v] if k != "scaling_ref" else v) for k, v in refs.items()}
    want = reference.importance_penalty_many([o.double() for o in omegas], a64, b64, scaling=scalings,
                                             weights=weights, **refs64)
    want.backward()
    assert rel_err(total, want) <= FORWARD_TOL[torch.float32]
    for k, (x, y) in enumerate(zip(a + b, a64 + b64)):
        if y.grad.abs().sum() > 0:
            tol = GRAD_TOL[x.dtype]
            assert rel_err(x.grad, y.grad) <= tol, k
        else:
            assert float(x.grad.abs().sum()) == 0.0


def test_penalty_is_bitwise_deterministic(device):
    step = make_step(333, 257, 8, torch.float32, seed=5, device=device)
    omega = torch.rand(step.omega.shape, generator=torch.Generator().manual_seed(3)).to(device)
    runs = [native.importance_penalty(omega, step.a1, step.b1, step.a0, step.b0, scaling=2.0) for _ in range(3)]
    for value, ga, gb in runs[1:]:
        assert torch.equal(value, runs[0][0]) and torch.equal(ga, runs[0][1]) and torch.equal(gb, runs[0][2])


# ---- on a GPU only ----

GPU_SHAPES = [(1, 1, 1), (7, 5, 3), (65, 129, 9), (576, 576, 8), (192, 576, 8), (3072, 1024, 8), (1024, 3072, 64)]


@requires_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FACTOR_DTYPES, ids=str)
def test_gpu_kernels_match_reference(shape, dtype):
    out, inn, r = shape
    step = make_step(out, inn, r, dtype, seed=out + inn + r, device="cuda")
    want = step.omega.double().clone()
    reference.accumulate_omega_(want, *(t.double() for t in step.args()[1:]), lr=1e-3, scaling=2.0)
    _poison("cuda")
    ops.accumulate_omega_(*step.args(), lr=1e-3, scaling=2.0)
    assert rel_err(step.omega, want) <= FORWARD_TOL[dtype]
    _poison("cuda")
    got = ops.finalize_importance(step.omega, step.a1, step.b1, scaling=2.0, xi=1e-3, a_start=step.a0, b_start=step.b0)
    ref = reference.finalize_importance(step.omega.double(), step.a1.double(), step.b1.double(), scaling=2.0,
                                        xi=1e-3, a_start=step.a0.double(), b_start=step.b0.double())
    assert rel_err(got, ref) <= FORWARD_TOL[dtype]
    # Ω of order 1 for the penalty: a finalized Ω can be so small that float16 gradients are
    # subnormal, where rounding to float16 alone is ~10 % (measured on the H200 at (1, 1, 1)).
    weights = torch.rand(got.shape, generator=torch.Generator().manual_seed(out + inn)).to("cuda")
    a, b = step.a1.clone().requires_grad_(), step.b1.clone().requires_grad_()
    a64, b64 = step.a1.double().requires_grad_(), step.b1.double().requires_grad_()
    _poison("cuda")
    p = ops.importance_penalty(weights, a, b, step.a0, step.b0, scaling=2.0)
    p.backward()
    p64 = reference.importance_penalty(weights.double(), a64, b64, step.a0.double(), step.b0.double(), scaling=2.0)
    p64.backward()
    assert rel_err(p, p64) <= FORWARD_TOL[dtype]
    assert rel_err(a.grad, a64.grad) <= GRAD_TOL[dtype] and rel_err(b.grad, b64.grad) <= GRAD_TOL[dtype]


@requires_cuda
@pytest.mark.parametrize("omega_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_penalty_reads_low_precision_omega(omega_dtype):
    step = make_step(300, 200, 8, torch.float32, seed=9, device="cuda")
    omega = torch.rand(step.omega.shape, device="cuda").to(omega_dtype)
    got = ops.importance_penalty(omega, step.a1, step.b1, step.a0, step.b0, scaling=2.0)
    want = reference.importance_penalty(omega.double(), step.a1.double(), step.b1.double(), step.a0.double(),
                                        step.b0.double(), scaling=2.0)
    assert rel_err(got, want) <= 1e-5


@requires_cuda
def test_gpu_tch_fallback_agrees_and_runs_on_the_current_stream():
    step = make_step(200, 300, 8, torch.float32, seed=4, device="cuda")
    omega = torch.rand(step.omega.shape, device="cuda")
    fused = ops.importance_penalty(omega, step.a1, step.b1, scaling=2.0)
    native.set_cuda_path("tch")
    try:
        via_tch = ops.importance_penalty(omega, step.a1, step.b1, scaling=2.0)
    finally:
        native.set_cuda_path("fused")
    assert rel_err(fused, via_tch) <= 1e-5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), warnings.catch_warnings():
        warnings.simplefilter("error")
        on_stream = ops.importance_penalty(omega, step.a1, step.b1, scaling=2.0)
    stream.synchronize()
    assert rel_err(on_stream, fused) <= 1e-6
