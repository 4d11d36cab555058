"""Backend selection, the torch-version guard, and rayon after fork (DataLoader workers)."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hlora
from hlora import ops, reference

from conftest import make_step, rel_err


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_forcing_torch_backend_uses_reference():
    proc = _run("import hlora; print(hlora.backend())", HLORA_BACKEND="torch")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "torch"


def test_torch_backend_still_computes_the_maths():
    proc = _run("""
        import torch, hlora
        from hlora import ops
        om = torch.full((3, 4), 0.5); a = torch.ones(2, 4); b = torch.ones(3, 2)
        ops.accumulate_omega_(om, a, b, a, b, 2 * a, 2 * b, lr=0.0, scaling=1.0)
        # g~ = 2·1·1 + 2·1·1 = 4 per entry; dθ = (2·2 − 1·1)·2 = 6 → ω = 0.5 − 24
        print(hlora.backend(), float(om[0, 0]))
    """, HLORA_BACKEND="torch")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["torch", "-23.5"]


def test_another_torch_keeps_the_native_kernels_on_the_view_provider():
    # Any torch but the one the tch provider was built for: the view provider, silently — no
    # warning and no fallback to plain PyTorch.
    code = """
        import warnings, torch
        torch.__version__ = "2.99.0"
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import hlora
        print(hlora.backend(), hlora.backend_info()["provider"], sum("hlora" in str(x.message) for x in w))
    """
    for backend in ("", "rust"):
        proc = _run(code, HLORA_BACKEND=backend, HLORA_PROVIDER="")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["rust", "view", "0"]


@pytest.mark.skipif("tch" not in hlora.backend_info()["providers"], reason="a build without the tch provider")
def test_the_tch_provider_forced_under_another_torch_fails_by_name():
    code = """
        import warnings, torch
        torch.__version__ = "2.99.0"
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import hlora
        print(hlora.backend(), sum("native kernels unavailable" in str(x.message) for x in w))
    """
    auto = _run(code, HLORA_BACKEND="", HLORA_PROVIDER="tch")
    assert auto.returncode == 0, auto.stderr
    assert auto.stdout.split() == ["torch", "1"]
    forced = _run(code, HLORA_BACKEND="rust", HLORA_PROVIDER="tch")
    assert forced.returncode != 0
    assert "HLORA_PROVIDER=tch" in forced.stderr and "built for torch 2.11.0" in forced.stderr


@pytest.mark.skipif(hlora.backend() != "rust", reason="checks the native module's providers")
def test_hlora_provider_chooses_the_provider_and_backend_info_says_which():
    code = "import hlora, json; print(json.dumps(hlora.backend_info()))"
    compiled = hlora.backend_info()["providers"]
    for provider in compiled:
        proc = _run(code, HLORA_PROVIDER=provider)
        assert proc.returncode == 0, proc.stderr
        import json

        info = json.loads(proc.stdout)
        assert info["provider"] == provider and info["providers"] == compiled and info["backend"] == "rust"
        assert info["simd"] in ("avx512", "avx2", "plain") and info["cpu_threading"] in ("openmp", "rayon")
        assert info["built_for_torch"] == ("2.11.0" if "tch" in compiled else None)
    bad = _run("import hlora", HLORA_PROVIDER="libtorch", HLORA_BACKEND="rust")
    assert bad.returncode != 0 and "HLORA_PROVIDER must be 'tch' or 'view'" in bad.stderr


def test_invalid_backend_name_is_an_error():
    proc = _run("import hlora", HLORA_BACKEND="cuda")
    assert proc.returncode != 0 and "HLORA_BACKEND must be" in proc.stderr


def _child_update(queue):
    # torch's own OpenMP team cannot run after fork (what DataLoader works around by setting one
    # thread in its workers), so hlora leaves it alone in a child and rebuilds its rayon pool; it
    # is asked for two threads here so a parent team or pool reused by mistake would hang.
    torch.set_num_threads(1)
    os.environ["HLORA_NUM_THREADS"] = "2"
    step = make_step(300, 200, 8, torch.float32, seed=2)
    want = step.f64()
    reference.accumulate_omega_(*want.args(), lr=1e-3, scaling=2.0)
    ops.accumulate_omega_(*step.args(), lr=1e-3, scaling=2.0)
    queue.put(rel_err(step.omega, want.omega))


@pytest.mark.skipif(hlora.backend() != "rust", reason="fork guard is a property of the native pool")
def test_kernels_work_in_a_forked_child_after_the_parent_used_the_pool():
    # The parent uses the pool first, so the child inherits a pool object without threads.
    step = make_step(300, 200, 8, torch.float32, seed=1)
    ops.accumulate_omega_(*step.args(), lr=1e-3, scaling=2.0)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_update, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the kernel deadlocked in a forked child")
    assert child.exitcode == 0
    assert queue.get(timeout=5) <= 1e-5


class _PenaltyDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        step = make_step(64, 48, 4, torch.float32, seed=i)
        return ops.importance_penalty(torch.rand(64, 48), step.a1, step.b1, scaling=1.0)


def test_dataloader_workers_can_call_kernels():
    ops.importance_penalty(torch.rand(8, 8), torch.randn(2, 8), torch.randn(8, 2), scaling=1.0)
    loader = torch.utils.data.DataLoader(_PenaltyDataset(), batch_size=2, num_workers=2,
                                         multiprocessing_context="fork", timeout=60)
    values = torch.cat([batch for batch in loader])
    assert values.shape == (4,) and torch.isfinite(values).all() and (values > 0).all()


def test_gil_is_released_during_kernels():
    """Two Python threads running kernels overlap (each call releases the GIL)."""
    import threading

    step = make_step(1024, 1024, 8, torch.float32, seed=3)
    errors = []

    def work():
        try:
            for _ in range(3):
                ops.finalize_importance(step.omega, step.a1, step.b1, scaling=1.0, xi=1e-3)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)


@pytest.mark.skipif(hlora.backend() != "rust", reason="checks the compiled module")
def test_the_extensions_thread_state_lookup_answers_as_cpythons():
    """src/pycompat.rs: the module defines CPython's `_PyThreadState_UncheckedGet`, which torch-sys's
    pybind11 glue calls and Python 3.13 removed (the glue reaches this definition where the
    interpreter has none). Called directly, on any Python, it answers as CPython's: the calling
    thread's state while it holds the GIL, null while it does not."""
    import ctypes
    import threading

    from hlora._loader import NATIVE

    def lookup(library):
        fn = library(NATIVE.__file__)._PyThreadState_UncheckedGet
        fn.restype = ctypes.c_void_p
        return fn

    with_gil, without_gil = lookup(ctypes.PyDLL), lookup(ctypes.CDLL)  # CDLL calls release the GIL
    current = ctypes.pythonapi.PyThreadState_Get
    current.restype = ctypes.c_void_p
    seen = {}

    def answers(key):
        seen[key] = (with_gil(), current(), without_gil())

    answers("main")
    thread = threading.Thread(target=answers, args=("other",))
    thread.start()
    thread.join(timeout=60)
    for key in ("main", "other"):
        held, expected, released = seen[key]
        assert held is not None and held == expected and released is None, key
    assert seen["main"][0] != seen["other"][0]


@pytest.mark.skipif(hlora.backend() != "rust", reason="checks the compiled module")
def test_stubs_match_the_native_module():
    import ast
    import inspect
    from pathlib import Path

    from hlora import _native

    stub = ast.parse((Path(hlora.__file__).parent / "_native.pyi").read_text())
    stubbed = {n.name: n for n in stub.body if isinstance(n, ast.FunctionDef)}
    exported = {name for name, obj in vars(_native).items() if callable(obj) and not name.startswith("__")}
    assert set(stubbed) == exported
    for name, node in stubbed.items():
        runtime = inspect.signature(getattr(_native, name))
        stub_params = [a.arg for a in node.args.args + node.args.kwonlyargs]
        assert stub_params == list(runtime.parameters), name


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_numpy_importance_beside_tracked_factors_keeps_the_gradient(backend):
    """Ω as NumPy (an analysis result) with factors autograd tracks: the penalty must stay
    differentiable — a NumPy or detached result would drop its gradient without a word."""
    proc = _run("""
        import numpy as np, torch
        from hlora import ops, reference
        g = torch.Generator().manual_seed(0)
        om = torch.rand(7, 5, generator=g)
        a0, b0 = torch.randn(2, 5, generator=g), torch.randn(7, 2, generator=g)
        a, b = (a0 + 0.1).requires_grad_(), (b0 - 0.1).requires_grad_()
        a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        want = torch.autograd.grad(reference.importance_penalty(om.double(), a64, b64, a0, b0, scaling=2.0), (a64, b64))
        for call in (lambda: ops.importance_penalty(om.numpy(), a, b, a0.numpy(), b0, scaling=2.0),
                     lambda: ops.importance_penalty_many([om.numpy()], [a], [b], [a0.numpy()], [b0], scaling=2.0)):
            p = call()
            got = torch.autograd.grad(p, (a, b))
            print(type(p).__name__, max(float((x - y).norm() / y.norm()) for x, y in zip(got, want)))
        with torch.no_grad():  # nothing tracked: NumPy in, NumPy out
            print(type(ops.importance_penalty(om.numpy(), a, b, scaling=2.0)).__name__)
    """, HLORA_BACKEND=backend)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == ["Tensor", "Tensor", "ndarray"]
    assert all(float(line[1]) <= 1e-5 for line in lines[:2])


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_many_ops_take_numpy_and_give_numpy_back(backend):
    """The ``_many`` ops behave like the single-matrix ones: NumPy Ω/ω in, NumPy out, with the
    same values — on both backends (the plain-PyTorch one once refused NumPy ω in
    finalize_importance_many with a TypeError that contradicted itself)."""
    proc = _run("""
        import numpy as np
        from hlora import ops
        rng = np.random.default_rng(0)
        shapes, weights = [(5, 7), (3, 4)], [1.0, 3.0]
        om = [rng.random(s, dtype=np.float32) for s in shapes]
        a = [rng.standard_normal((2, s[1])).astype(np.float32) for s in shapes]
        b = [rng.standard_normal((s[0], 2)).astype(np.float32) for s in shapes]
        a0, b0 = [0.5 * x for x in a], [0.5 * x for x in b]
        mats = list(zip(om, a, b, a0, b0))
        p = ops.importance_penalty_many(om, a, b, a0, b0, scaling=2.0, weights=weights)
        want = sum(w * float(ops.importance_penalty(*m, scaling=2.0)) for w, m in zip(weights, mats))
        print(type(p).__name__, p.shape == (), abs(float(p) - want) / want)
        omegas, norms = ops.finalize_importance_many(om, a, b, a0, b0, scaling=2.0, xi=1e-3)
        singles = [ops.finalize_importance(o, x, y, scaling=2.0, xi=1e-3, a_start=x0, b_start=y0)
                   for o, x, y, x0, y0 in mats]
        print(" ".join(type(t).__name__ for t in (*omegas, norms)),
              max(float(np.abs(x - y).max() / np.abs(y).max()) for x, y in zip(omegas, singles)),
              float(np.abs(norms - [np.linalg.norm(y.astype(np.float64)) for y in singles]).max() / norms.max()))
    """, HLORA_BACKEND=backend)
    assert proc.returncode == 0, proc.stderr
    (p_type, scalar, p_err), line = (x.split() for x in proc.stdout.strip().splitlines())
    assert (p_type, scalar) == ("ndarray", "True") and float(p_err) <= 1e-6
    assert line[:3] == ["ndarray"] * 3 and float(line[3]) <= 1e-6 and float(line[4]) <= 1e-6
