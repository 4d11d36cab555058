"""scripts/contract_fuzz.py, the random campaign against DESIGN's formulas: a short run passes on
the kernels, a wrong kernel is caught, and a case replays to the same numbers."""

from __future__ import annotations

import pytest
import torch

from hlora import ops

from conftest import REPO


@pytest.fixture
def fuzz(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import contract_fuzz

    return contract_fuzz


def test_a_short_campaign_passes_and_covers_every_op(fuzz, capsys):
    assert fuzz.main(["--seconds", "4", "--seed", "11"]) == 0
    out = capsys.readouterr().out
    for name in ("omega update/", "finalize/", "penalty/", "penalty grads/", "many: total/", "many: grads/",
                 "many: omega update/", "many: finalize/", "many: norms/"):
        assert name in out, out
    assert out.rstrip().endswith(" 0 failed")


def test_a_wrong_penalty_is_caught(fuzz, monkeypatch, capsys):
    right = ops.importance_penalty

    def off_by_1e4(*args, **kwargs):
        return right(*args, **kwargs) * (1 + 1e-4)  # value and gradients 1e-4 off

    monkeypatch.setattr(ops, "importance_penalty", off_by_1e4)
    penalty_cases = [str(n) for n in range(2, 40, len(fuzz.CASES))]  # case n runs CASES[n % len(CASES)]
    assert fuzz.main(["--seed", "0", "--replay", *penalty_cases]) == 1
    out = capsys.readouterr().out
    assert "FAILED case 2: penalty" in out and "--seed 0 --replay 2)" in out


def test_a_case_replays_to_the_same_numbers(fuzz):
    for number in range(8):
        first = fuzz.run_case(5, number, torch.device("cpu")).results
        assert first and fuzz.run_case(5, number, torch.device("cpu")).results == first


def test_the_campaign_runs_on_the_tch_path_and_leaves_the_fused_one_on(fuzz, capsys):
    from hlora import _native

    assert fuzz.main(["--seed", "3", "--cpu-path", "tch", "--replay", *map(str, range(10))]) == 0
    assert "cpu-path=tch" in capsys.readouterr().out
    assert _native.cpu_path() == "fused"
