"""Step checkpoints (``hlora record``/``finetune --checkpoint-every``): a run killed mid-way and
resumed ends with exactly what an uninterrupted run computes; a checkpoint of other settings, or a
torn file, is refused by name."""

from __future__ import annotations

import os

import pytest
import torch

import hlora
from hlora.adapters import find_adapted
from hlora.experiments import experiment
from hlora.experiments.checkpoint import StepCheckpoint

from tiny import TokenData, tiny_lora_model

STEPS, EVERY = 7, 2
SETTINGS = {"command": "record", "steps": STEPS, "lr": 1e-2, "seed": 3}


class Killed(Exception):
    """Stands for the crash: raised by the batches after some steps."""


def _killed_after(batches, steps: int):
    for i, batch in enumerate(batches):
        if i == steps:
            raise Killed
        yield batch


def _importance():
    model = tiny_lora_model(seed=51)
    recorder = hlora.ImportanceRecorder(model, xi=1e-3)
    experiment.train(model, experiment.general_batches(TokenData(12, seed=6).seqs, 3, 3, seed=1), 3, 1e-2,
                     recorder=recorder, progress=False)
    return recorder.finalize()


def _run(kind: str, checkpoint=None, kill_after=None, importance=None):
    """One training of the tiny model: recording Ω ("record") or under the penalty of an
    importance recorded beforehand ("finetune"); returns what the run produces."""
    model = tiny_lora_model(seed=50)
    recorder = hlora.ImportanceRecorder(model, xi=1e-3) if kind == "record" else None
    penalty = hlora.Regularizer(model, importance, phi=10.0).penalty if kind == "finetune" else None
    batches = experiment.general_batches(TokenData(24, seed=5).seqs, 3, STEPS, seed=3)
    if kill_after is not None:
        batches = _killed_after(batches, kill_after)
    history = experiment.train(model, batches, STEPS, 1e-2, recorder=recorder, penalty=penalty, progress=False,
                               checkpoint=checkpoint)
    adapter = {m.name: (m.a.detach().clone(), m.b.detach().clone()) for m in find_adapted(model)}
    omega = recorder.finalize().matrices if recorder is not None else {}
    return history, adapter, omega


@pytest.mark.parametrize("kind", ["record", "finetune"])
def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result(kind, tmp_path):
    importance = _importance() if kind == "finetune" else None
    want_history, want_adapter, want_omega = _run(kind, importance=importance)
    path = str(tmp_path / "resume.pt")
    with pytest.raises(Killed):  # after five steps: the checkpoint of step 4 is on disk
        _run(kind, StepCheckpoint(path, SETTINGS, EVERY), kill_after=5, importance=importance)
    resumed = StepCheckpoint(path, SETTINGS, EVERY)
    assert resumed.step == 4
    history, adapter, omega = _run(kind, resumed, importance=importance)
    assert history == want_history and [h["step"] for h in history] == list(range(1, STEPS + 1))
    for name, (a, b) in want_adapter.items():
        assert torch.equal(adapter[name][0], a) and torch.equal(adapter[name][1], b), name
    for name, om in want_omega.items():
        assert torch.equal(omega[name], om), name
    if kind == "finetune":
        assert all(h["penalty"] > 0 for h in history[1:])
    # The last checkpoint is the one after the last step: rerun from there (a crash while the
    # outputs were written), the training is not done again.
    assert StepCheckpoint(path, SETTINGS, EVERY).step == STEPS
    again = _run(kind, StepCheckpoint(path, SETTINGS, EVERY), importance=importance)
    assert again[0] == want_history and all(torch.equal(again[2][n], om) for n, om in want_omega.items())
    resumed.remove()  # what the command does once its outputs are written
    assert not os.path.exists(path)


def test_a_checkpoint_of_other_settings_or_a_torn_file_is_refused_by_name(tmp_path):
    path = str(tmp_path / "resume.pt")
    with pytest.raises(Killed):
        _run("record", StepCheckpoint(path, SETTINGS, EVERY), kill_after=3)
    with pytest.raises(ValueError, match=r"resume.pt holds a run interrupted with other settings \(lr 0.01 → 0.1\)"):
        StepCheckpoint(path, {**SETTINGS, "lr": 0.1}, EVERY)
    with open(path, "r+b") as f:  # torn: half the file
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="resume.pt is not a readable hlora checkpoint"):
        StepCheckpoint(path, SETTINGS, EVERY)
    torch.save({"something": "else"}, path)
    with pytest.raises(ValueError, match="is not an hlora step checkpoint"):
        StepCheckpoint(path, SETTINGS, EVERY)
    # every=0: no checkpoint written.
    os.unlink(path)
    with pytest.raises(Killed):
        _run("record", StepCheckpoint(path, SETTINGS, 0), kill_after=5)
    assert not os.path.exists(path)
