"""hlora.testing — the helpers users' own suites call — checked by use: on every op and factor
dtype they pass, a deliberately wrong op fails with a message naming what went wrong, and the
pytest file docs/testing.md shows runs as printed."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from hlora import ops, testing
from hlora.testing import OPS, LoraCase, assert_matches_reference, random_lora_case

from conftest import FACTOR_DTYPES, REPO


@pytest.mark.parametrize("dtype", FACTOR_DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_every_op_matches_the_reference_in_every_dtype(op, dtype, cpu_path):
    cases = [random_lora_case(out, inn, r, dtype=dtype, seed=out) for out, inn, r in ((37, 29, 5), (8, 130, 3))]
    before = [case.omega.clone() for case in cases]
    assert_matches_reference(op, cases if "many" in op else cases[0])
    assert all(torch.equal(b, case.omega) for b, case in zip(before, cases))  # inputs untouched


def test_cases_are_seeded_realistic_and_the_same_in_every_dtype():
    case = random_lora_case(40, 24, 4, dtype=torch.float64, seed=7)
    assert case.shape == (40, 24, 4) and case.omega.dtype == case.Omega.dtype == torch.float64
    assert bool((case.Omega >= 0).all()) and case.Omega.abs().sum() > 0 and case.omega.abs().sum() > 0
    step = (case.a_next - case.a_prev).norm() / case.a_prev.norm()
    assert 1e-3 < float(step) < 1e-1  # a small step: the update's change cancels in naive float32
    bf16 = random_lora_case(40, 24, 4, dtype=torch.bfloat16, seed=7)
    assert bf16.a.dtype == torch.bfloat16 and bf16.omega.dtype == torch.float32
    assert torch.equal(bf16.a, case.a.to(torch.bfloat16))
    assert not torch.equal(random_lora_case(40, 24, 4, seed=8).a, case.a.float())


def test_a_wrong_op_fails_naming_the_op_the_dtype_and_the_worst_element(monkeypatch):
    exact = ops.importance_penalty
    monkeypatch.setattr(ops, "importance_penalty", lambda *a, **kw: exact(*a, **kw) * 1.001)
    with pytest.raises(AssertionError) as failed:
        assert_matches_reference("importance_penalty", random_lora_case(37, 29, 5, seed=3))
    message = str(failed.value)
    assert message.startswith("importance_penalty (float32 factors, float32, cpu): the value P differs")
    assert re.search(r"by 0\.001 relative \(tolerance 1e-05\); worst element at index \(\): got [\d.]+, "
                     r"reference [\d.]+$", message), message


def test_a_wrong_gradient_is_named_with_its_index(monkeypatch):
    # Gradients too: one entry of ∂P/∂b off by 1 % fails with that entry's index.
    backward = ops._FusedPenalty.backward

    def skewed(ctx, grad_out):
        grads = list(backward(ctx, grad_out))
        grads[2] = grads[2].clone()
        grads[2][5, 1] *= 1.01
        return tuple(grads)

    monkeypatch.setattr(ops._FusedPenalty, "backward", staticmethod(skewed))
    case = random_lora_case(37, 29, 5, seed=3)
    with pytest.raises(AssertionError, match=r"∂P/∂b differs .* worst element at index \(5, 1\)"):
        assert_matches_reference("importance_penalty", case)


def test_bad_arguments_are_named():
    case = random_lora_case(4, 4, 2)
    with pytest.raises(ValueError, match="op_name must be one of"):
        assert_matches_reference("penalty", case)
    with pytest.raises(TypeError, match="case must be an hlora.testing.LoraCase"):
        assert_matches_reference("importance_penalty", [case])
    with pytest.raises(TypeError, match="takes a non-empty list of LoraCase"):
        assert_matches_reference("importance_penalty_many", case)
    with pytest.raises(ValueError, match="must share a factor dtype"):
        assert_matches_reference("importance_penalty_many", [case, random_lora_case(4, 4, 2, dtype=torch.float64)])
    with pytest.raises(ValueError, match="r must be a positive integer"):
        random_lora_case(4, 4, 0)
    with pytest.raises(TypeError, match="dtype must be one of"):
        random_lora_case(4, 4, 2, dtype=torch.int32)
    assert isinstance(case, LoraCase) and testing.GRAD_TOL[torch.bfloat16] == 1e-2


def test_the_docs_pytest_file_runs_as_printed(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "testing.md").read_text(), flags=re.S)
    assert len(blocks) == 1
    (tmp_path / "test_users_suite.py").write_text(blocks[0])
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", done.stdout).group(1))
    assert passed == 2 * len(OPS) * (2 if torch.cuda.is_available() else 1)
