"""The README's Python blocks run as printed: the quickstart of the ops on random factors, and the
PEFT + Trainer pattern on a tiny Llama (the names the README leaves to the reader are defined here)."""

from __future__ import annotations

import re

import torch
from transformers import TrainingArguments

import hlora

from conftest import REPO
from tiny import TokenData, tiny_base_model


def _python_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"the README should have one Python block with {containing!r}"
    return found[0]


def test_the_quickstart_runs_as_printed(capsys):
    g = torch.Generator().manual_seed(3)

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    a0, b0 = rnd(8, 576, scale=0.02), rnd(576, 8, scale=0.02)
    grad_a, grad_b = rnd(8, 576, scale=1e-3), rnd(576, 8, scale=1e-3)
    a1, b1 = a0 - 8e-4 * grad_a.sign(), b0 - 8e-4 * grad_b.sign()
    a, b = (a1 + rnd(8, 576, scale=1e-3)).requires_grad_(), (b1 + rnd(576, 8, scale=1e-3)).requires_grad_()
    names = {"a0": a0, "b0": b0, "grad_a": grad_a, "grad_b": grad_b, "a1": a1, "b1": b1, "a": a, "b": b,
             "a_ref": a1, "b_ref": b1, "phi": 1e3, "task_loss": (a * a).sum() + (b * b).sum()}
    exec(_python_block("ops.accumulate_omega_"), names)
    omega, importance = names["omega"], names["Omega"]
    assert omega.shape == importance.shape == (576, 576)
    assert omega.abs().sum() > 0 and torch.isfinite(importance).all() and importance.min() >= 0
    assert names["penalty"].item() > 0
    assert a.grad is not None and b.grad is not None and torch.isfinite(a.grad).all()
    assert capsys.readouterr().out.strip() == hlora.backend()


def test_the_trainer_pattern_runs_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the block writes importance.safetensors where it runs

    def args(name: str) -> TrainingArguments:
        return TrainingArguments(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=4,
                                 learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                                 use_cpu=True, disable_tqdm=True)

    names = {"base": tiny_base_model(seed=5), "args_general": args("general"), "args_domain": args("domain"),
             "general": TokenData(32, seed=6), "domain": TokenData(32, seed=7)}
    exec(_python_block("ImportanceCallback"), names)
    imp = hlora.Importance.load(str(tmp_path / "importance.safetensors"))
    assert imp.meta["steps"] == 4 and len(imp.names) == 4  # q_proj and v_proj of both layers
    logged = [entry for entry in names["trainer"].state.log_history if "hlora/penalty" in entry]
    assert len(logged) == 4 and all(entry["hlora/penalty"] >= 0 for entry in logged)
    assert any(entry["hlora/penalty"] > 0 for entry in logged)
