"""Record importance on general data, then fine-tune on a domain with the penalty — two
`transformers.Trainer` runs, one hlora callback each.

    python examples/trainer_record_then_finetune.py [--model NAME] [--general FILE] [--domain FILE] [--steps 20]

Prints the general-data loss before and after the domain phase, with and without hlora's
penalty: the rise is the forgetting hlora holds back.
"""

from __future__ import annotations

import copy
import os

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import hlora
import hlora.hf

from _common import arguments, blocks, load_model, read_text


def general_loss(model, examples) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=ex["input_ids"][None], labels=ex["labels"][None]).loss.item() for ex in examples]
    model.train()
    return sum(losses) / len(losses)


def main(argv=None) -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args(argv)
    base, tokenizer = load_model(args.model)
    general, domain = blocks(read_text(args.general, "general"), tokenizer), blocks(read_text(args.domain, "domain"),
                                                                                   tokenizer)
    held_out, general = general[:4], general[4:]  # never trained on: the forgetting is measured here

    def training(name: str) -> TrainingArguments:
        return TrainingArguments(output_dir=os.path.join(args.out, name), max_steps=args.steps,
                                 per_device_train_batch_size=4, learning_rate=8e-4,
                                 logging_steps=max(1, args.steps // 4), save_strategy="no", report_to=[],
                                 use_cpu=not torch.cuda.is_available())

    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    importance_file = os.path.join(args.out, "importance.safetensors")

    # 1. General data (task ν): the callback records importance at every optimizer step.
    recorder = hlora.hf.ImportanceCallback(importance_file, xi=1e-3)
    Trainer(model=model, args=training("general"), train_dataset=general, callbacks=[recorder]).train()
    after_general = general_loss(model, held_out)

    # 2. Domain data (task μ), continuing the adapter — once plainly, once with the penalty.
    plain = copy.deepcopy(model)
    Trainer(model=plain, args=training("plain"), train_dataset=domain).train()
    regularizer = hlora.hf.RegularizationCallback(importance_file, phi=args.phi)
    trainer = Trainer(model=model, args=training("hlora"), train_dataset=domain, callbacks=[regularizer])
    trainer.train()
    model.save_pretrained(os.path.join(args.out, "domain_adapter"))

    penalties = [entry["hlora/penalty"] for entry in trainer.state.log_history if "hlora/penalty" in entry]
    print(f"general loss after the general phase: {after_general:.4f}")
    print(f"after the domain phase, plain LoRA:   {general_loss(plain, held_out):.4f}")
    print(f"after the domain phase, with hlora:   {general_loss(model, held_out):.4f}")
    print(f"penalty (φ·Σ c·P) at each logging step: {', '.join(f'{p:.3g}' for p in penalties)}")


if __name__ == "__main__":
    main()
