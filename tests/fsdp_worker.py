"""One rank of the FSDP2 tests (tests/test_fsdp.py), under torchrun on the CPU (gloo, real
`fully_shard`): the tiny Llama with 16 heads and one KV head, so v_proj has 2 rows — at world size
3 one rank holds none of them — and LoRA r = 4 on q_proj and v_proj.

    python -m torch.distributed.run --nproc_per_node N tests/fsdp_worker.py SCENARIO OUT [ARGS]

Scenarios (each rank writes OUT/<scenario>-rank<r>.pt with what the test compares):
  record STEPS          record STEPS steps of the general data, save the importance (sharded) to
                        OUT/importance.safetensors; then train 3 domain steps without a penalty and
                        take the penalty's value and gradients, apart and in one backward with a task loss
  resume STOP STEPS     record to STOP, checkpoint (model and optimizer through
                        torch.distributed.checkpoint, the recorder's rows) and exit; rerun: resume
                        from the checkpoint to STEPS and save the importance
  callbacks             hlora.hf's callbacks driven as Trainer drives them (see trainer_callbacks)
  load PATH             load PATH (written at any world size) for this rank's rows
  crash PATH            save the importance at PATH again, rank 1 dying after its rows are written
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hlora  # noqa: E402
from hlora import _sharding  # noqa: E402

from tiny import TokenData, fsdp2_shard, tiny_lora_model  # noqa: E402

GLOBAL_BATCH = 6  # sequences per optimizer step, split evenly over 1, 2 or 3 ranks
LR = 5e-3
STEPS = 4  # recorded steps of the callbacks scenario (the test's record runs pass theirs)


def model_and_optimizer(sharded: bool):
    model = tiny_lora_model(seed=7, heads=16, kv_heads=1)
    if sharded:
        fsdp2_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=LR)


def batch(data: TokenData, step: int, rank: int, world: int) -> dict:
    """This rank's share of the step's global batch (the single process takes all of it)."""
    per = GLOBAL_BATCH // world
    first = (step * GLOBAL_BATCH + rank * per) % (len(data) - GLOBAL_BATCH)
    items = [data[i] for i in range(first, first + per)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def record(model, optimizer, recorder, steps: range, rank: int, world: int, timings: list) -> None:
    general = TokenData(64, seed=11)
    for step in steps:
        model(**batch(general, step, rank, world)).loss.backward()
        t0 = time.perf_counter()
        recorder.before_step()
        t1 = time.perf_counter()
        optimizer.step()
        t2 = time.perf_counter()
        recorder.after_step()
        timings.append((t1 - t0) + (time.perf_counter() - t2))
        optimizer.zero_grad()


def whole_grads(model) -> dict:
    from hlora.adapters import find_adapted

    out = {}
    for m in find_adapted(model):
        for which, p in (("a", m.a), ("b", m.b)):
            g = p.grad
            out[f"{m.name}/{which}"] = (g.full_tensor() if _sharding.is_sharded(g) else g).clone()
    return out


def penalties(model, optimizer, importance, rank: int, world: int) -> dict:
    """The penalty's value (summed over the ranks) and gradients, after 3 domain steps without it;
    and the gradients of task + penalty in one backward against the two apart."""
    domain = TokenData(64, seed=12)
    for step in range(3):
        model(**batch(domain, step, rank, world)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    reg = hlora.Regularizer(model, importance, phi=10.0, anchor="reference")
    value = reg.penalty()
    value.backward()
    out = {"penalty": float(reg.total(value)), "coefficients": reg.coefficients.clone(),
           "penalty_grads": whole_grads(model)}
    optimizer.zero_grad()
    task = model(**batch(domain, 3, rank, world)).loss
    task.backward()
    apart = whole_grads(model)
    optimizer.zero_grad()
    reg.penalty().backward()
    for k, g in whole_grads(model).items():
        apart[k] = apart[k] + g
    optimizer.zero_grad()
    (model(**batch(domain, 3, rank, world)).loss + reg.penalty()).backward()
    out["together"], out["apart"] = whole_grads(model), apart
    optimizer.zero_grad()
    return out


def trainer_callbacks(model, optimizer, out: str, rank: int, world: int) -> dict:
    """hlora's Trainer callbacks called as Trainer calls them (accelerate turns FSDP on only for
    GPU set-ups, so Trainer itself cannot run FSDP2 on a CPU): record STEPS steps with
    ImportanceCallback, stopping at step 2 for a checkpoint and going on with a new callback
    resumed from it; then a domain step with RegularizationCallback loading the saved file; then
    a Regularizer built before the model was sharded, rebuilt the way HLoRATrainer does."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hlora.hf import ImportanceCallback, RegularizationCallback

    args = TrainingArguments(output_dir=os.path.join(out, "run"), fsdp=True, fsdp_config={"version": 2},
                             use_cpu=True, report_to=[])
    state, control = TrainerState(), TrainerControl()
    state.is_world_process_zero = rank == 0
    path = os.path.join(out, "callback-importance.safetensors")
    general = TokenData(64, seed=11)
    callback = ImportanceCallback(path)
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    for step in range(STEPS):
        if step == 2:  # a checkpoint, then a restart that resumes from it
            callback.on_save(args, state, control)
            callback = ImportanceCallback(path)
            callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
        model(**batch(general, step, rank, world)).loss.backward()
        callback.on_pre_optimizer_step(args, state, control, optimizer=optimizer)
        optimizer.step()
        callback.on_optimizer_step(args, state, control, optimizer=optimizer)
        optimizer.zero_grad()
        state.global_step += 1
    callback.on_train_end(args, state, control)

    regularizing = RegularizationCallback(path, phi=10.0, anchor="reference")
    regularizing.on_train_begin(args, state, control, model=model)
    domain = TokenData(64, seed=12)
    for step in range(2):  # the penalty is 0 until a step has moved the adapter from the reference
        model(**batch(domain, step, rank, world)).loss.backward()
        regularizing.on_pre_optimizer_step(args, state, control)
        if step == 0:
            optimizer.step()
            optimizer.zero_grad()
    logs = {"loss": 1.0}
    regularizing.on_log(args, state, control, logs=logs)  # the mean over both steps, summed over ranks
    found = {"callback_grads": whole_grads(model), "callback_penalty": logs["hlora/penalty"]}
    optimizer.zero_grad()

    fresh = tiny_lora_model(seed=8, heads=16, kv_heads=1)  # a fresh adapter against the recorded one
    built_before = hlora.Regularizer(fresh, hlora.Importance.load(path), phi=10.0, anchor="reference")
    if world > 1:
        fsdp2_shard(fresh)
        assert not built_before.uses_parameters_of(fresh)  # fully_shard replaced every parameter
    rebuilt = built_before.rebuilt_for(fresh)
    assert rebuilt.uses_parameters_of(fresh)
    value = rebuilt.penalty()
    value.backward()
    found.update(rebuilt_penalty=float(rebuilt.total(value)), rebuilt_grads=whole_grads(fresh))
    return found


def checkpoint_state(model, optimizer, folder: str, save: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    if save:
        dcp.save(state, checkpoint_id=folder)
    else:
        dcp.load(state, checkpoint_id=folder)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model, optimizer = model_and_optimizer(sharded=True)
    result: dict = {"world": world}
    if scenario == "record":
        steps = int(sys.argv[3])
        recorder = hlora.ImportanceRecorder(model, optimizer, xi=1e-3)
        timings: list = []
        record(model, optimizer, recorder, range(steps), rank, world, timings)
        importance = recorder.finalize()
        importance.save(os.path.join(out, "importance.safetensors"))
        result.update(rows=dict(importance.rows), omega_bytes=sum(om.numel() * om.element_size()
                                                                  for om in importance.matrices.values()),
                      norms=importance.norms(), record_seconds=timings,
                      local={n: om.clone() for n, om in importance.matrices.items()})
        result.update(penalties(model, optimizer, importance, rank, world))
    elif scenario == "resume":
        stop, steps = int(sys.argv[3]), int(sys.argv[4])
        folder = os.path.join(out, "checkpoint")
        recorder = hlora.ImportanceRecorder(model, optimizer, xi=1e-3)
        state_file = os.path.join(folder, "recorder.safetensors")
        resuming = os.path.isdir(folder)
        if resuming:
            checkpoint_state(model, optimizer, folder, save=False)
            recorder.load_state(state_file)
        record(model, optimizer, recorder, range(recorder.steps, stop if not resuming else steps), rank, world, [])
        if not resuming:
            checkpoint_state(model, optimizer, folder, save=True)
            recorder.save_state(state_file)
        else:
            recorder.finalize().save(os.path.join(out, "resumed.safetensors"))
    elif scenario == "callbacks":
        result.update(trainer_callbacks(model, optimizer, out, rank, world))
    elif scenario == "load":
        importance = hlora.Importance.load(sys.argv[3], shard_for=model)
        importance.check(model)
        result.update(rows=dict(importance.rows), local={n: om.clone() for n, om in importance.matrices.items()},
                      b_ref={n: b.clone() for n, (_, b) in importance.references.items()})
    elif scenario == "crash":
        importance = hlora.Importance.load(sys.argv[3], shard_for=model)
        importance = hlora.Importance({n: om * 2 for n, om in importance.matrices.items()}, importance.references,
                                      importance.scalings, importance.meta, importance.rows, importance.group)
        if rank == 1:
            real = hlora._io.save_atomic

            def dies_after_writing(*args, **kwargs):
                real(*args, **kwargs)
                os._exit(3)  # after its rows, before the index: the worst moment

            hlora._io.save_atomic = dies_after_writing
        importance.save(sys.argv[3])
    torch.save(result, os.path.join(out, f"{scenario}-rank{rank}.pt"))
    # Every rank done with its collectives before any tears the group down (CI once saw a rank
    # abort at the end: "terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    # Results are on disk: leave without the interpreter's teardown, where gloo's threads and
    # objects are destroyed in no fixed order (a test checks the files, not torch's exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
