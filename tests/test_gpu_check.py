"""scripts/gpu_check.py, the one-run device check of the CUDA kernels, dry-run on CPU through
the kernels' emulator: the script a lent GPU runs must not fail for a reason a CPU could show."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

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


@pytest.mark.skipif(hlora.backend() != "rust", reason="native backend not active")
def test_kernel_timings_script_prints_a_row_per_kernel(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "scripts" / "dev"))
    import kernel_timings

    threads = torch.get_num_threads()
    try:
        assert kernel_timings.main(["--only", "192x576", "--calls", "3", "--pause-ms", "0.1", "--flush-mb", "1",
                                    "--threads", str(threads + 1)]) == 0
        assert torch.get_num_threads() == threads  # the caller's setting restored
    finally:
        sys.modules.pop("kernel_timings", None)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| SmolLM2")]
    assert [row.split(" | ")[1] for row in rows] == ["penalty fwd+bwd (ops)", "omega update", "penalty + grads",
                                                     "penalty only"]
    for row in rows:
        times = [float(t) for cell in row.strip(" |").split(" | ")[2:] for t in cell.split(" / ")]
        assert len(times) == 6 and all(t > 0 for t in times)


@pytest.mark.skipif(hlora.backend() != "rust", reason="native backend not active")
def test_simd_ab_script_times_each_variant_it_is_asked_for(monkeypatch, capsys):
    from hlora import _native

    monkeypatch.syspath_prepend(str(REPO / "scripts" / "dev"))
    import simd_ab

    variants = sorted({"plain", _native.simd_level()})
    try:
        for op in ("omega", "finalize", "penalty", "value"):
            assert simd_ab.main(["--op", op, "--shape", "9x33", "--rounds", "1", "--calls", "5",
                                 "--variants", ",".join(variants)]) == 0
    finally:
        sys.modules.pop("simd_ab", None)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [(row[0], row[3]) for row in rows] == [
        (op, v) for op in ("omega", "finalize", "penalty", "value") for v in variants]
    for row in rows:
        assert row[1] == "9x33" and 0 < float(row[5]) <= float(row[8])


@pytest.mark.skipif(hlora.backend() != "rust", reason="native backend not active")
def test_build_ab_script_loads_two_builds_side_by_side_and_compares_them(tmp_path, monkeypatch, capsys):
    from hlora._loader import NATIVE

    monkeypatch.syspath_prepend(str(REPO / "scripts" / "dev"))
    import build_ab

    copy = tmp_path / "before.so"
    shutil.copyfile(NATIVE.__file__, copy)
    ops = ("omega", "finalize", "penalty", "value")
    threads = torch.get_num_threads()
    try:
        for op in ops:
            assert build_ab.main(["--before", str(copy), "--op", op, "--shape", "9x33", "--calls", "5",
                                  "--threads", str(threads + 1)]) == 0
            assert torch.get_num_threads() == threads  # the caller's setting restored
        lines = capsys.readouterr().out.splitlines()
        # Ω stored in half precision: the same comparison.
        assert build_ab.main(["--before", str(copy), "--op", "penalty", "--shape", "9x33", "--calls", "5",
                              "--omega-dtype", "bfloat16"]) == 0
        half = capsys.readouterr().out.splitlines()
        assert half[0].endswith("0.00e+00 0.00e+00 0.00e+00") and len(half) == 3
        # Caches evicted before every call: said so, and the same comparison.
        assert build_ab.main(["--before", str(copy), "--op", "omega", "--shape", "9x33", "--calls", "5",
                              "--cold"]) == 0
        cold = capsys.readouterr().out.splitlines()
        assert cold[0].startswith("omega 9x33 threads=1 cold ") and cold[0].endswith(": 0.00e+00")
        assert len(cold) == 3
        moved = build_ab._evictor()()  # the eviction is a real copy, larger than L2
        assert moved.numel() * moved.element_size() == 8 << 20 and bool(moved.abs().sum() > 0)
        with pytest.raises(SystemExit, match="no file"):
            build_ab.main(["--before", str(tmp_path / "missing.so")])
        with pytest.raises(SystemExit):  # the ω update takes a float32 ω here
            build_ab.main(["--before", str(copy), "--op", "omega", "--omega-dtype", "float16"])
    finally:
        sys.modules.pop("build_ab", None)
    assert len(lines) == 3 * len(ops)
    for op, (diffs, before, after) in zip(ops, zip(lines[0::3], lines[1::3], lines[2::3])):
        # Two copies of one build: the same numbers, bit for bit (penalty: value and both gradients).
        values = diffs.split(": ")[1].split()
        assert values == ["0.00e+00"] * (3 if op == "penalty" else 1), diffs
        for line, name in ((before, "before"), (after, "after")):
            row = line.split()
            assert row[:4] == [op, "9x33", f"threads={threads + 1}", name]
            assert 0 < float(row[5]) <= float(row[8])
