"""EWC-LoRA (Xiang et al., 2024): an empirical diagonal Fisher of the full adapted weights on
general data, and the penalty λ·Σ F ⊙ (s·B·A)² anchored at the pre-trained weights W0.

The Fisher is the mean over *sequences* of squared per-sequence gradients (the data's own next
tokens as labels) — not the square of a batch-mean gradient, a known bug in several public
implementations. Each sequence gets its own backward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from tqdm.auto import tqdm

from hlora import _checks as check
from hlora import ops
from hlora.adapters import find_adapted, unwrap


@dataclass
class Fisher:
    """F per adapted weight (keyed like :class:`~hlora.Importance`), and what it cost."""

    matrices: Dict[str, torch.Tensor]
    sequences: int
    seconds: float

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.matrices.values())


def _base_linear(module: torch.nn.Module) -> torch.nn.Linear:
    return module.base_layer if hasattr(module, "base_layer") else module


def empirical_fisher(peft_model: torch.nn.Module, sequences: torch.Tensor, adapter: str = "default",
                     progress: bool = False) -> Fisher:
    """Diagonal Fisher of every LoRA-adapted base weight, from one backward per sequence."""
    if len(sequences) == 0:  # the mean over none would be 0/0: a NaN Fisher
        raise ValueError("sequences is empty: the Fisher is a mean over at least one sequence")
    start = time.perf_counter()
    names = [m.name for m in find_adapted(peft_model, adapter)]
    modules = dict(unwrap(peft_model).named_modules())  # named as find_adapted names them
    weights = {n: _base_linear(modules[n]).weight for n in names}
    # GPT-2-style Conv1D layers store W as (in, out) (PEFT's fan_in_fan_out); F must be (out, in)
    # like s·B·A, or a square F would be silently transposed.
    transposed = {n: bool(getattr(modules[n], "fan_in_fan_out", False)) for n in names}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    saved = {id(w): w.requires_grad for w in weights.values()}
    for p in trainable:
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    device = next(peft_model.parameters()).device
    try:
        peft_model.eval()
        with peft_model.disable_adapter():  # F at W0
            for seq in tqdm(sequences, desc="EWC Fisher", disable=not progress, leave=False):
                ids = seq.unsqueeze(0).to(device)
                loss = peft_model(input_ids=ids, labels=ids).loss
                grads = torch.autograd.grad(loss, list(weights.values()))
                for n, g in zip(weights, grads):
                    fisher[n].add_(g.float().square())
    finally:
        for w in weights.values():
            w.requires_grad_(saved[id(w)])
        for p in trainable:
            p.requires_grad_(True)
    for n, f in fisher.items():
        f.div_(len(sequences))
        if transposed[n]:
            fisher[n] = f.t().contiguous()
    return Fisher(fisher, len(sequences), time.perf_counter() - start)


class EWCPenalty:
    """λ·Σ_l Σ F_l ⊙ (s·B_l·A_l)², differentiable w.r.t. the LoRA factors (the fused kernel with
    Ω = F and no reference factors)."""

    def __init__(self, peft_model: torch.nn.Module, fisher: Fisher, lam: float, adapter: str = "default") -> None:
        if not isinstance(fisher, Fisher):
            raise TypeError(f"fisher must be an hlora.experiments.baselines.ewc.Fisher, got {type(fisher).__name__}")
        self.lam = check.non_negative(lam, "lam")
        self.matrices = find_adapted(peft_model, adapter)
        missing = [m.name for m in self.matrices if m.name not in fisher.matrices]
        if missing:
            raise ValueError(f"no Fisher for {missing}")
        device = self.matrices[0].a.device
        self.f: List[torch.Tensor] = [fisher.matrices[m.name].to(device) for m in self.matrices]

    def penalty(self) -> torch.Tensor:
        return ops.importance_penalty_many(self.f, [m.a for m in self.matrices], [m.b for m in self.matrices],
                                           scaling=[m.scaling for m in self.matrices], weights=self.lam)


def sequences_for_budget(blocks: torch.Tensor, steps: int, batch: int) -> Sequence[torch.Tensor]:
    """The general sequences HLoRA's ν phase sees (same token budget for a fair comparison)."""
    return blocks[: steps * batch]
