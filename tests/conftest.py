"""Shared fixtures: random factors (never zeros), dtypes and the tolerances of DESIGN §2."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

import hlora
from hlora.testing import FORWARD_TOL, GRAD_TOL  # noqa: F401 — the project's tolerances are users' (DESIGN §2)

REPO = Path(__file__).resolve().parents[1]

FACTOR_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def pinned_versions(path: Path, *, every_python: bool = False) -> Dict[str, List[str]]:
    """The exact pins of a pip constraints file (scripts/constraints*.txt), by canonical name: those
    whose marker this Python meets, or all of them. A line that is not a single `==` pin fails."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: Dict[str, List[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            specs = list(req.specifier)
            assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}: {line!r} is not an exact pin"
            if every_python or req.marker is None or req.marker.evaluate():
                pins.setdefault(canonicalize_name(req.name), []).append(specs[0].version)
    return pins


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


@dataclass
class Step:
    """One optimizer step of one adapted matrix: factors before/after, gradients, ω."""

    omega: torch.Tensor
    a0: torch.Tensor
    b0: torch.Tensor
    ga: torch.Tensor
    gb: torch.Tensor
    a1: torch.Tensor
    b1: torch.Tensor

    def args(self):
        return (self.omega, self.a0, self.b0, self.ga, self.gb, self.a1, self.b1)

    def f64(self) -> Step:
        return Step(*(t.double() for t in self.args()))


def make_step(out: int, inn: int, r: int, dtype: torch.dtype, seed: int = 0,
              device: str = "cpu", step_size: float = 1e-2, omega_dtype: Optional[torch.dtype] = None) -> Step:
    """Random LoRA factors at a realistic scale, a small step (so dθ is a difference of nearly
    equal products — where a naive float32 formula cancels), and ω of the update's magnitude."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    a0, b0 = rnd(r, inn, scale=0.1), rnd(out, r, scale=0.1)
    ga, gb = rnd(r, inn, scale=0.5), rnd(out, r, scale=0.5)
    a1 = a0 + step_size * rnd(r, inn, scale=0.1)
    b1 = b0 + step_size * rnd(out, r, scale=0.1)
    cast = [t.to(dtype) for t in (a0, b0, ga, gb, a1, b1)]
    odt = omega_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    # ω on the scale of one update (g~·dθ ~ 0.1·0.5·s · step·0.01·s): so errors in the update
    # show in the result instead of hiding under ω's own rounding.
    omega = (rnd(out, inn) * 1e-4).to(odt)
    return Step(omega.to(device), *(t.to(device) for t in cast))


def cancelling_omega(d: torch.Tensor, cancel: float, seed: int, negative_from_row: int | None = None) -> torch.Tensor:
    """Float32 Ω of mixed signs whose terms Ω·D² cancel: Σ Ω·D² ≈ Σ |Ω|·D² / ``cancel``
    (D in float64). Such Ω are legitimate (``clamp="none"``: the paper's text). Signs at random,
    or (``negative_from_row``) Ω ≥ 0 above that row and < 0 from it on."""
    g = torch.Generator().manual_seed(seed)
    if negative_from_row is None:
        omega = torch.randn(d.shape, generator=g, dtype=torch.float64)
    else:
        omega = torch.rand(d.shape, generator=g, dtype=torch.float64) + 0.1
        omega[negative_from_row:] *= -1
    pos, neg = (omega.clamp_min(0) * d**2).sum(), (-omega.clamp_max(0) * d**2).sum()
    k = pos * (cancel - 1) / (neg * (cancel + 1))  # pos − k·neg = (pos + k·neg) / cancel
    return torch.where(omega < 0, omega * k, omega).float()


@pytest.fixture(autouse=True, scope="session")
def _backend_is_what_ci_asked_for():
    """Under HLORA_BACKEND=rust (what .ci/run exports) the native module must be in use: a broken
    build must never pass by comparing the reference with itself. HLORA_EXPECT_PROVIDER names the
    provider it must use (the environments of tests/test_versions.py: view)."""
    if os.environ.get("HLORA_BACKEND") == "rust":
        assert hlora.backend() == "rust"
    if os.environ.get("HLORA_EXPECT_PROVIDER"):
        assert hlora.backend_info()["provider"] == os.environ["HLORA_EXPECT_PROVIDER"]
    yield


@pytest.fixture(scope="session")
def cuda_emulator(tmp_path_factory) -> Path:
    """The CUDA kernels' source built to run on CPU threads (scripts/cuda_emulator.py)."""
    pytest.importorskip("hlora._native")
    sys.path.insert(0, str(REPO / "scripts"))
    import cuda_emulator as emulator

    return emulator.build(tmp_path_factory.mktemp("cuda_emulator"))


@pytest.fixture(params=["fused", "tch", "cuda-emulator"])
def cpu_path(request):
    """Runs a test on the fused CPU kernels, on the tch path (the CUDA fallback) and on the
    CUDA kernels executed by their CPU emulator (the code CUDA tensors take)."""
    native = pytest.importorskip("hlora._native")
    if hlora.backend() != "rust":
        pytest.skip("native backend not active")
    if request.param == "cuda-emulator":
        native.set_cpu_path("cuda-emulator", emulator=str(request.getfixturevalue("cuda_emulator")))
    else:
        native.set_cpu_path(request.param)
    yield request.param
    native.set_cpu_path("fused")


#: The emulator runs a GPU's threads on two cores: keep it to shapes of up to this many entries
#: (the odd shapes are what it is for; the large ones run on the fused/tch paths and on a GPU).
EMULATOR_MAX_ENTRIES = 600_000


def pytest_collection_modifyitems(config, items):
    # The tch path exists only with the tch provider (HLORA_PROVIDER=view runs the suite without it).
    no_tch_path = hlora.backend_info()["provider"] != "tch"
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        shape = params.get("shape")
        too_big = isinstance(shape, tuple) and len(shape) == 3 and shape[0] * shape[1] > EMULATOR_MAX_ENTRIES
        unavailable = params.get("cpu_path") == "tch" and no_tch_path
        (drop if (params.get("cpu_path") == "cuda-emulator" and too_big) or unavailable else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
