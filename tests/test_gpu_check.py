"""scripts/gpu_check.py, the one-run device check of the CUDA kernels, dry-run on CPU through
the kernels' emulator: the script a lent GPU runs must not fail for a reason a CPU could show."""

from __future__ import annotations

import sys

import pytest

import hlora

from conftest import REPO


@pytest.mark.slow
@pytest.mark.skipif(hlora.backend() != "rust", reason="native backend not active")
def test_gpu_check_dry_run_reports_correctness_and_timings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the emulator is built under ./target
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import gpu_check

    from hlora import _native

    try:
        code = gpu_check.main(["--dry-run", "--out", str(tmp_path / "report.md")])
    finally:
        _native.set_cpu_path("fused")
        sys.modules.pop("gpu_check", None)
    report = (tmp_path / "report.md").read_text()
    assert code == 0, report
    assert "all within tolerance" in report
    for section in ("## Correctness", "## Timings", "## Overhead", "70 matrices in one call", "bfloat16 Ω storage"):
        assert section in report
