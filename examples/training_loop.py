"""hlora in a plain PyTorch training loop: `ImportanceRecorder` around the optimizer steps on
general data, then `Regularizer.penalty()` added to the loss on domain data.

    python examples/training_loop.py [--model NAME] [--general FILE] [--domain FILE] [--steps 20]
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, get_peft_model

import hlora

from _common import arguments, blocks, load_model, read_text


def batches(examples, size: int = 4):
    while True:  # cycle through the data
        for i in range(0, len(examples) - size + 1, size):
            yield {k: torch.stack([ex[k] for ex in examples[i:i + size]]) for k in examples[0]}


def main(argv=None) -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args(argv)
    base, tokenizer = load_model(args.model)
    general = batches(blocks(read_text(args.general, "general"), tokenizer))
    domain = batches(blocks(read_text(args.domain, "domain"), tokenizer))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=8e-4)

    # 1. General data (task ν): the recorder snapshots the factors around each optimizer step.
    recorder = hlora.ImportanceRecorder(model, optimizer, xi=1e-3)
    for _ in range(args.steps):
        model(**next(general)).loss.backward()
        recorder.before_step()       # after backward (and any clipping), right before the step
        optimizer.step()
        recorder.after_step()        # ω += −g~ ⊙ dθ: one fused pass over every adapted matrix
        optimizer.zero_grad()
    importance = recorder.finalize()  # Ω = ω / (Δ² + ξ), with the adapter now as reference
    os.makedirs(args.out, exist_ok=True)
    importance.save(os.path.join(args.out, "importance.safetensors"))
    print(f"recorded {importance.meta['steps']} steps over {len(importance.names)} matrices")

    # 2. Domain data (task μ): the penalty keeps the important weights near their general values.
    regularizer = hlora.Regularizer(model, importance, phi=args.phi)
    for step in range(args.steps):
        task = model(**next(domain)).loss
        penalty = regularizer.penalty()
        (task + penalty).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step}: task loss {task.item():.4f}, penalty {penalty.item():.4g}")


if __name__ == "__main__":
    main()
