"""The real model end to end (slow): SmolLM2-135M with LoRA on q/v, Trainer recording on real
English text, then regularized fine-tuning that logs the penalty."""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import hlora
from hlora.experiments import models
from hlora.hf import ImportanceCallback, RegularizationCallback


class TextBlocks(torch.utils.data.Dataset):
    def __init__(self, tokenizer, text: str, seq: int = 64, n: int = 16):
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        self.blocks = [ids[i * seq:(i + 1) * seq] for i in range(min(n, len(ids) // seq))]

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i].clone()}


@pytest.mark.slow
def test_record_then_regularize_smollm2(tmp_path):
    torch.set_num_threads(2)
    base, tokenizer = models.load()
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))
    topics = pydoc_data.topics.topics  # real English prose (the Python docs), always installed
    general = TextBlocks(tokenizer, " ".join(topics[k] for k in sorted(topics)[:40]))
    domain = TextBlocks(tokenizer, " ".join(topics[k] for k in sorted(topics)[-40:]))
    args = dict(per_device_train_batch_size=2, learning_rate=8e-4, logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    rec = ImportanceCallback(str(tmp_path / "imp.safetensors"), xi=1e-3)
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "nu"), max_steps=3, **args),
            train_dataset=general, callbacks=[rec]).train()
    imp = hlora.Importance.load(str(tmp_path / "imp.safetensors"))
    assert len(imp.names) == 60 and imp.meta["steps"] == 3
    assert all(torch.isfinite(om).all() and (om >= 0).all() for om in imp.matrices.values())
    assert sum(float(om.sum()) for om in imp.matrices.values()) > 0
    reg = RegularizationCallback(imp, phi=1e3)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "mu"), max_steps=3, **args),
                      train_dataset=domain, callbacks=[reg])
    trainer.train()
    logged = [e for e in trainer.state.log_history if "hlora/penalty" in e]
    assert len(logged) == 3 and logged[0]["hlora/penalty"] == 0.0 and logged[-1]["hlora/penalty"] > 0
