"""FSDP2: importance recorded and used on LoRA factors sharded by `fully_shard` — real FSDP2 on
the CPU (gloo) under torchrun (tests/fsdp_worker.py), against one process on the same global
batches. World sizes 2 and 3: shards of uneven size, and at 3 a rank that holds none of v_proj's
two rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hlora
from hlora.adapters import find_adapted

from conftest import REPO, rel_err, requires_cuda

sys.path.insert(0, str(REPO / "tests"))
import fsdp_worker as worker  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = worker.STEPS


def torchrun(n: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           str(REPO / "tests" / "fsdp_worker.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def ranks(folder: Path, scenario: str, n: int) -> list:
    return [torch.load(folder / f"{scenario}-rank{r}.pt", weights_only=False) for r in range(n)]


@pytest.fixture(scope="module")
def single():
    """The same recipe in one process with whole factors and the whole global batch."""
    torch.manual_seed(0)
    model, optimizer = worker.model_and_optimizer(sharded=False)
    recorder = hlora.ImportanceRecorder(model, optimizer, xi=1e-3)
    worker.record(model, optimizer, recorder, range(STEPS), 0, 1, [])
    importance = recorder.finalize()
    return importance, worker.penalties(model, optimizer, importance, 0, 1)


_RECORDED: dict = {}


def recorded(world: int, tmp_path_factory) -> tuple:
    """The record scenario at `world` ranks, run once per session."""
    if world not in _RECORDED:
        folder = tmp_path_factory.mktemp(f"fsdp{world}")
        torchrun(world, "record", str(folder), str(STEPS))
        _RECORDED[world] = (world, folder, ranks(folder, "record", world))
    return _RECORDED[world]


@pytest.fixture(params=[2, 3], ids=["world-2", "world-3"])
def sharded(request, tmp_path_factory):
    return recorded(request.param, tmp_path_factory)


def test_sharded_recording_gives_the_single_process_importance(single, sharded):
    whole, _ = single
    world, folder, results = sharded
    loaded = hlora.Importance.load(str(folder / "importance.safetensors"))  # all ranks' rows, one process
    assert not loaded.is_sharded and loaded.names == whole.names
    for name in whole.names:
        assert rel_err(loaded.matrices[name], whole.matrices[name]) <= 1e-5, name
        assert rel_err(loaded.references[name][1], whole.references[name][1]) <= 1e-5, name
    norms = whole.norms()
    for r in results:  # the norms every rank computes cover the whole matrix (summed over ranks)
        assert all(abs(r["norms"][n] - norms[n]) <= 1e-5 * norms[n] for n in norms)


def test_each_rank_holds_only_its_rows(sharded):
    world, _, results = sharded
    for name, (_, _, rows) in results[0]["rows"].items():
        blocks = [r["rows"][name][:2] for r in results]
        assert blocks == [worker_chunk(rows, world, k) for k in range(world)]  # torch.chunk's rows, in order
        for r in results:
            assert r["local"][name].shape[0] == r["rows"][name][1] - r["rows"][name][0]
    v_proj = [n for n in results[0]["rows"] if n.endswith("v_proj")][0]
    if world == 3:
        assert [r["rows"][v_proj][:2] for r in results] == [(0, 1), (1, 2), (2, 2)]  # one rank holds none
    whole_bytes = sum(rows * 32 * 4 for _, _, rows in results[0]["rows"].values())
    held = [r["omega_bytes"] for r in results]
    assert sum(held) == whole_bytes and max(held) < whole_bytes  # the rows' share each, never the whole


def worker_chunk(rows: int, world: int, rank: int) -> tuple:
    from hlora._sharding import chunk_bounds

    return chunk_bounds(rows, world, rank)


def test_the_sharded_penalty_and_its_gradients_are_the_single_process_ones(single, sharded):
    _, want = single
    _, _, results = sharded
    for r in results:
        assert abs(r["penalty"] - want["penalty"]) <= 1e-5 * want["penalty"] and want["penalty"] > 0
        assert torch.allclose(r["coefficients"], want["coefficients"], rtol=1e-6, atol=0)
        for key, g in want["penalty_grads"].items():
            assert rel_err(r["penalty_grads"][key], g) <= 1e-5, key
        for key, g in r["apart"].items():  # task + penalty in one backward: the sum of the two
            assert rel_err(r["together"][key], g) <= 1e-6, key


def test_a_sharded_importance_loads_at_any_world_size(single, sharded, tmp_path):
    world, folder, _ = sharded
    other = 3 if world == 2 else 2
    path = str(folder / "importance.safetensors")
    torchrun(other, "load", str(tmp_path), path)
    whole = hlora.Importance.load(path)
    for r, result in enumerate(ranks(tmp_path, "load", other)):
        for name, (start, stop, rows) in result["rows"].items():
            assert (start, stop) == worker_chunk(rows, other, r)
            assert torch.equal(result["local"][name], whole.matrices[name][start:stop])
            assert torch.equal(result["b_ref"][name], whole.references[name][1][start:stop])


def test_a_crash_while_saving_keeps_the_previous_set(tmp_path_factory, tmp_path):
    _, folder, _ = recorded(2, tmp_path_factory)
    path = tmp_path / "importance.safetensors"
    for f in folder.glob("importance.safetensors*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    before = hlora.Importance.load(str(path))
    died = torchrun(2, "crash", str(tmp_path), str(path), check=False)
    assert died.returncode != 0
    after = hlora.Importance.load(str(path))  # still the whole previous set, not half of the new one
    assert all(torch.equal(after.matrices[n], before.matrices[n]) for n in before.names)


def test_resumed_sharded_recording_gives_the_uninterrupted_importance(sharded, tmp_path):
    world, folder, _ = sharded
    torchrun(world, "resume", str(tmp_path), "2", str(STEPS))  # records 2 steps, checkpoints, exits
    assert not (tmp_path / "resumed.safetensors").exists()
    torchrun(world, "resume", str(tmp_path), "2", str(STEPS))  # resumes from the checkpoint
    resumed = hlora.Importance.load(str(tmp_path / "resumed.safetensors"))
    uninterrupted = hlora.Importance.load(str(folder / "importance.safetensors"))
    for name in uninterrupted.names:
        assert rel_err(resumed.matrices[name], uninterrupted.matrices[name]) <= 1e-6, name


@requires_cuda
def test_a_model_wrapped_in_fsdp1_is_refused_naming_fsdp2(tmp_path):
    # FSDP1 needs an accelerator; one process, its real wrapper.
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from tiny import tiny_lora_model

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(tiny_lora_model(seed=1).cuda(), use_orig_params=True)
        with pytest.raises(ValueError, match=r"FSDP1 \(FullyShardedDataParallel\).*fully_shard"):
            find_adapted(wrapped)
    finally:
        dist.destroy_process_group()


def test_a_whole_importance_is_cut_to_a_sharded_models_rows_by_the_regularizer(single):
    # Without a process group the model is whole: shard_for returns the importance itself.
    whole, _ = single
    model, _ = worker.model_and_optimizer(sharded=False)
    assert whole.shard_for(model) is whole
    assert all(m.rows is None for m in find_adapted(model))


@pytest.fixture(scope="module")
def single_callbacks(tmp_path_factory):
    torch.manual_seed(0)
    model, optimizer = worker.model_and_optimizer(sharded=False)
    return worker.trainer_callbacks(model, optimizer, str(tmp_path_factory.mktemp("callbacks-1")), 0, 1)


def test_the_trainer_callbacks_under_fsdp2_give_the_single_process_results(single, single_callbacks, tmp_path):
    torchrun(3, "callbacks", str(tmp_path))  # 3 ranks: uneven shards, one holding none of v_proj
    whole, _ = single
    # recorded with a checkpoint at step 2 and a resumed callback: the uninterrupted importance
    recorded = hlora.Importance.load(str(tmp_path / "callback-importance.safetensors"))
    for name in whole.names:
        assert rel_err(recorded.matrices[name], whole.matrices[name]) <= 1e-5, name
    from hlora.hf import RECORDER_STATE_FILE

    stem, ext = os.path.splitext(RECORDER_STATE_FILE)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()) == [
        f"{stem}.rank{r:05d}-of-00003{ext}" for r in range(3)]  # each rank's rows, in a file of its own
    for r in ranks(tmp_path, "callbacks", 3):
        for key in ("callback", "rebuilt"):
            want = single_callbacks[f"{key}_penalty"]
            assert want > 0 and abs(r[f"{key}_penalty"] - want) <= 1e-5 * want, key
            for name, g in single_callbacks[f"{key}_grads"].items():
                assert rel_err(r[f"{key}_grads"][name], g) <= 1e-5, (key, name)
