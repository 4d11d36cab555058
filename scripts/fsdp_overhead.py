"""What hlora costs per training step under FSDP2 — recording (before_step + after_step, with their
gathers of A and its gradient) and the penalty's forward + backward — against the step itself.
Run it under torchrun; `--no-shard` times the same recipe without FSDP (run it with one process):

    python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/fsdp_overhead.py [--model tiny]
    python -m torch.distributed.run --standalone --nproc_per_node 1 scripts/fsdp_overhead.py --no-shard

Prints rank 0's medians (ms) over the timed steps, after two warm-up steps. LoRA r = 8 on q_proj and
v_proj, batch 2 × 128 tokens per rank, AdamW, float32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import hlora  # noqa: E402


def build(name: str, shard: bool):
    from peft import LoraConfig, get_peft_model

    if name == "tiny":
        from tiny import tiny_lora_model  # the test suite's random tiny Llama

        model = tiny_lora_model(seed=7)
    else:
        from transformers import AutoModelForCausalLM

        from hlora.experiments.models import resolve

        base = AutoModelForCausalLM.from_pretrained(resolve(None), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    if shard:
        from tiny import fsdp2_shard  # the test suite's wrapping: each decoder layer, then the model

        fsdp2_shard(model)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--no-shard", action="store_true", help="the same recipe without FSDP")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    model, optimizer = build(args.model, shard=not args.no_shard)
    vocab = model.config.vocab_size
    recorder = hlora.ImportanceRecorder(model, optimizer, xi=1e-3)
    times = {"step": [], "recording": [], "penalty": []}
    for i in range(args.steps + 2):
        ids = torch.randint(0, vocab, (2, 128))
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        t1 = time.perf_counter()
        recorder.before_step()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        recorder.after_step()
        t4 = time.perf_counter()
        optimizer.zero_grad()
        if i >= 2:
            times["step"].append((t1 - t0) + (t3 - t2))
            times["recording"].append((t2 - t1) + (t4 - t3))
    importance = recorder.finalize()
    held = torch.tensor([sum(om.numel() * om.element_size() for om in importance.matrices.values())])
    everyone = [torch.zeros_like(held) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, held)
    regularizer = hlora.Regularizer(model, importance, phi=1e3, anchor="zero")
    for i in range(args.steps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        regularizer.penalty().backward()
        if i >= 2:
            times["penalty"].append(time.perf_counter() - t0)
        optimizer.zero_grad()
    if dist.get_rank() == 0:
        step = statistics.median(times["step"])
        label = "no FSDP" if args.no_shard else f"FSDP2, {dist.get_world_size()} ranks"
        print(f"{args.model}, {label}: step {step * 1e3:.1f} ms", end="")
        for key in ("recording", "penalty"):
            value = statistics.median(times[key])
            print(f"; {key} {value * 1e3:.2f} ms ({100 * value / step:.2f} %)", end="")
        print(f"; Ω bytes per rank {[int(b) for b in everyone]}")
    # Every rank done with its collectives before any tears the group down (CI once saw a rank
    # abort at the end: "terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
