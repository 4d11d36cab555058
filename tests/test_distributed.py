"""Multi-process recording with the real Trainer under torchrun (DDP, gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hlora import Importance

from conftest import rel_err

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_record.py")


def _run(cmd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(cmd + [SCRIPT, str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
def test_ddp_importance_equals_single_process_and_only_rank0_writes(tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"],
         tmp_path / "ddp")
    _run([sys.executable], tmp_path / "single")
    r0 = Importance.load(str(tmp_path / "ddp" / "rank0.safetensors"))
    r1 = Importance.load(str(tmp_path / "ddp" / "rank1.safetensors"))
    single = Importance.load(str(tmp_path / "single" / "rank0.safetensors"))
    assert r0.meta["steps"] == single.meta["steps"] == 5
    for name in single.names:
        assert (r0.matrices[name] == r1.matrices[name]).all(), "Ω must be identical on every rank"
        assert float(single.matrices[name].sum()) > 0
        assert rel_err(r0.matrices[name], single.matrices[name]) <= 1e-5
    saves = [json.loads((tmp_path / "ddp" / f"saves{r}.json").read_text()) for r in (0, 1)]
    assert saves[0]["world"] == 2
    assert len(saves[0]["saves"]) == 1 and saves[1]["saves"] == []
    assert os.path.isfile(tmp_path / "ddp" / "importance.safetensors")
