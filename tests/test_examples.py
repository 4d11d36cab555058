"""The scripts under examples/ — what users copy — run as a user runs them, on the tiny Llama saved
as a model folder (any `from_pretrained` name works the same) and small text files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import hlora

from conftest import REPO
from tiny import save_tiny_model_folder

EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("example-inputs")
    model = save_tiny_model_folder(folder / "model", seed=4)
    general = folder / "general.txt"
    general.write_text(" ".join(f"The {w} walked to the market and bought bread." for w in
                                ("baker", "farmer", "teacher", "child", "sailor", "miller")) * 12)
    domain = folder / "domain.txt"
    domain.write_text("\n".join(f"Question: what is {a} plus {b}? Answer: {a + b}." for a in range(20)
                                for b in range(6)))
    return ["--model", model, "--general", str(general), "--domain", str(domain), "--steps", "3"]


def _run(script: str, args, tmp_path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args, "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_trainer_example_records_then_finetunes(inputs, tmp_path) -> None:
    out = _run("trainer_record_then_finetune.py", inputs, tmp_path)
    assert (tmp_path / "out" / "importance.safetensors").is_file()
    assert (tmp_path / "out" / "domain_adapter" / "adapter_config.json").is_file()
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    losses = [float(lines[k]) for k in ("general loss after the general phase", "after the domain phase, plain LoRA",
                                        "after the domain phase, with hlora")]
    assert all(loss > 0 for loss in losses)
    penalties = [float(p) for p in lines["penalty (φ·Σ c·P) at each logging step"].split(",")]
    assert penalties and all(p >= 0 for p in penalties)


def test_the_plain_loop_example_records_then_regularizes(inputs, tmp_path) -> None:
    out = _run("training_loop.py", inputs, tmp_path)
    assert "recorded 3 steps over 4 matrices" in out
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [s.split(":")[0] for s in steps] == ["step 0", "step 2"]
    assert float(steps[-1].rsplit("penalty", 1)[1]) > 0  # the adapter moved away from its reference
    assert (tmp_path / "out" / "importance.safetensors").is_file()


@pytest.mark.slow
def test_the_fsdp2_example_runs_under_torchrun(inputs, tmp_path) -> None:
    args = [*inputs, "--out", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(EXAMPLES / "fsdp2.py"), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    held = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    assert len(held) == 2 and all("recorded 3 steps over 4 matrices" in line for line in held)
    parts = [line.rsplit("holds ", 1)[1].split() for line in held]  # "<held> of Ω's <whole> bytes"
    assert int(parts[0][0]) + int(parts[1][0]) == int(parts[0][3]) and int(parts[0][0]) < int(parts[0][3])
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [s.split(":")[0] for s in steps] == ["step 0", "step 2"] and float(steps[-1].rsplit("penalty", 1)[1]) > 0
    whole = hlora.Importance.load(str(tmp_path / "out" / "importance.safetensors"))  # both ranks' rows
    assert len(whole.names) == 4 and not whole.is_sharded
