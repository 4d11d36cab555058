"""The CLI and the benchmark script run end to end (what they print, not how fast)."""

from __future__ import annotations

import subprocess
import sys

from hlora import bench, cli


def test_bench_rows_cover_every_op_and_shape():
    rows = bench.run(threads=1, repeats=2, shapes=[("tiny", 17, 33), ("odd", 5, 3)])
    assert [(r["shape"], r["op"]) for r in rows] == [
        (f"{n} ({o}x{i})", op) for n, o, i in [("tiny", 17, 33), ("odd", 5, 3)] for op in bench.PASSES]
    for r in rows:
        assert r["reference_ms"] > 0 and r["hlora_ms"] > 0 and r["speedup"] > 0
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "speed-up" in table


def test_cli_help_and_unknown_command():
    proc = subprocess.run([sys.executable, "-m", "hlora.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout and "bench" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "hlora.cli", "fly"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_quick_example_prints_real_numbers(capsys):
    cli._quick_example()
    out = capsys.readouterr().out
    assert "penalty of a drifted A" in out and "nan" not in out.lower()
