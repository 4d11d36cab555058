"""The CLI and the benchmark script run end to end (what they print, not how fast)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hlora import bench, cli, ops


def test_bench_rows_cover_every_op_and_shape():
    rows = bench.run(threads=1, repeats=2, shapes=[("tiny", 17, 33), ("odd", 5, 3)])
    assert [(r["shape"], r["op"]) for r in rows] == [
        (f"{n} ({o}x{i})", op) for n, o, i in [("tiny", 17, 33), ("odd", 5, 3)] for op in bench.PASSES]
    for r in rows:
        assert r["reference_ms"] > 0 and r["hlora_ms"] > 0 and r["speedup"] > 0
        # The no-work autograd Function is timed beside the penalty only.
        assert ("ceiling" in r) == (r["op"] == bench.DIFFERENTIABLE)
        if "ceiling" in r:
            assert r["no_work_ms"] > 0 and r["ceiling"] == pytest.approx(r["reference_ms"] / r["no_work_ms"])
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "speed-up" in table
    ceilings = bench.format_ceilings(rows)
    assert ceilings.count("\n") == 3 and "ceiling" in ceilings and "odd (5x3)" in ceilings


def test_no_work_function_passes_on_the_kernels_gradients():
    """The bench's floor is the penalty's autograd round trip with the same results: the value and
    the gradients that reach a and b are hlora's own (scaled by the incoming gradient)."""
    x = bench._inputs(9, 13, 3, torch.device("cpu"))
    a = x["a1"].clone().requires_grad_()
    b = x["b1"].clone().requires_grad_()
    value = ops.importance_penalty(x["omega"], a, b, x["a0"], x["b0"], scaling=4.0)
    (3.0 * value).backward()
    results = (value.detach(), a.grad.clone() / 3.0, b.grad.clone() / 3.0)
    a2 = x["a1"].clone().requires_grad_()
    b2 = x["b1"].clone().requires_grad_()
    out = bench._NoWork.apply(x["omega"], a2, b2, x["a0"], x["b0"], *results)
    (3.0 * out).backward()
    assert torch.equal(out.detach(), value.detach())
    torch.testing.assert_close(a2.grad, a.grad)
    torch.testing.assert_close(b2.grad, b.grad)


def test_cli_help_and_unknown_command():
    proc = subprocess.run([sys.executable, "-m", "hlora.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout and "bench" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "hlora.cli", "fly"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_quick_example_prints_real_numbers(capsys):
    cli._quick_example()
    out = capsys.readouterr().out
    assert "penalty of a drifted A" in out and "nan" not in out.lower()


def test_bad_numbers_are_usage_errors_not_empty_runs(capsys, tmp_path):
    # --steps -5 used to record nothing and write an all-zero importance file.
    for argv, message in ((["record", "--out", str(tmp_path), "--steps", "-5"], "--steps: must be at least 1"),
                          (["record", "--out", str(tmp_path), "--lr", "nan"], "--lr: must be finite"),
                          (["finetune", "--out", str(tmp_path), "--phi", "-1"], "--phi: must be 0 or more"),
                          (["bench", "--threads", "0"], "--threads: must be at least 1"),
                          (["experiment", "--seeds", "two"], "--seeds: expected a whole number")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_errors_past_parsing_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hlora.cli", "finetune", "--out", str(tmp_path),
                           "--importance", str(tmp_path / "missing.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("hlora finetune: error: no such file:")
    assert "Traceback" not in proc.stderr
