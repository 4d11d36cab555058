"""hlora under FSDP2 (`torch.distributed.fsdp.fully_shard`): each rank holds its block of every
matrix's rows of ω, Ω and the reference — never the whole — and the penalty's gradients are those
of one process. Runs on GPUs (NCCL) or, to try it, on the CPU (gloo):

    torchrun --nproc_per_node 2 examples/fsdp2.py [--model NAME] [--general FILE] [--domain FILE] [--steps 20]

The importance is saved as one file per rank plus an index; `Importance.load(path)` reads it whole in
one process, or `Importance.load(path, shard_for=model)` this rank's rows at any world size.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh

try:
    from torch.distributed.fsdp import fully_shard  # torch >= 2.6
except ImportError:  # torch 2.4 and 2.5
    from torch.distributed._composable.fsdp import fully_shard

import hlora

from _common import arguments, blocks, load_model, read_text


def my_batches(examples, rank: int, world: int, size: int = 2):
    """This rank's share of each global batch (what a DistributedSampler would give it)."""
    step = size * world
    while True:
        for i in range(0, len(examples) - step + 1, step):
            mine = examples[i + rank * size:i + (rank + 1) * size]
            yield {k: torch.stack([ex[k] for ex in mine]) for k in mine[0]}


def main(argv=None) -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    base, tokenizer = load_model(args.model)
    general = my_batches(blocks(read_text(args.general, "general"), tokenizer), rank, world)
    domain = my_batches(blocks(read_text(args.domain, "domain"), tokenizer), rank, world)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"])).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in model.base_model.model.model.layers:  # each decoder layer, then the whole model
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # After fully_shard: its parameters are the sharded ones the optimizer must get.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=8e-4)

    # 1. General data: the recorder keeps this rank's rows of ω (A is gathered whole, it is tiny).
    recorder = hlora.ImportanceRecorder(model, optimizer, xi=1e-3)
    for _ in range(args.steps):
        model(**{k: v.to(device) for k, v in next(general).items()}).loss.backward()
        recorder.before_step()
        optimizer.step()
        recorder.after_step()
        optimizer.zero_grad()
    importance = recorder.finalize()  # ‖Ω_l‖ summed over the ranks; each rank keeps its rows
    os.makedirs(args.out, exist_ok=True)
    importance.save(os.path.join(args.out, "importance.safetensors"))  # every rank, together
    held = sum(om.numel() * om.element_size() for om in importance.matrices.values())
    whole = sum(importance.rows[n][2] * om.shape[1] * om.element_size() for n, om in importance.matrices.items())
    line = (f"rank {rank}: recorded {importance.meta['steps']} steps over {len(importance.names)} matrices; "
            f"holds {held} of Ω's {whole} bytes")
    lines: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)  # rank 0 prints them all: ranks' prints would interleave
    if rank == 0:
        print("\n".join(str(each) for each in lines), flush=True)

    # 2. Domain data: each rank's penalty covers its rows; backward gives every factor the
    #    gradient of the whole penalty, and total() adds the ranks' parts up for the log.
    regularizer = hlora.Regularizer(model, importance, phi=args.phi)
    for step in range(args.steps):
        task = model(**{k: v.to(device) for k, v in next(domain).items()}).loss
        penalty = regularizer.penalty()
        (task + penalty).backward()
        optimizer.step()
        optimizer.zero_grad()
        total = regularizer.total(penalty)  # a collective: every rank calls it
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step}: task loss {task.item():.4f}, penalty {total.item():.4g}")
    # Every rank done with its collectives before any tears the group down (CI once saw a rank
    # abort at the end: "terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
