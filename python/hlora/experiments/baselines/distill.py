"""KL to the ν model on general batches (LwF-style distillation): β · KL(p_ν ‖ p_θ), the mean
over the batch's tokens of the divergence of the trained model's next-token distribution from
the ν model's, which a frozen copy with the ν adapter gives (one extra forward, no gradients)."""

from __future__ import annotations

import copy
from typing import Dict, Iterator

import torch
import torch.nn.functional as F

from hlora import _checks as check


class KLToReference:
    """``penalty()`` — called once per step, as the experiments' ``train`` calls it — takes the
    next general batch and returns β·KL. ``reference`` is a copy of ``model`` made now, after the
    caller has put the reference adapter (the ν one) in it."""

    def __init__(self, model: torch.nn.Module, batches: Iterator[Dict[str, torch.Tensor]], beta: float) -> None:
        self.beta = check.non_negative(beta, "beta")
        self.model, self.batches = model, batches
        self.reference = copy.deepcopy(model).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)

    def divergence(self, input_ids: torch.Tensor) -> torch.Tensor:
        """KL(p_ref ‖ p_θ) per token, averaged over the batch's tokens (in float32)."""
        with torch.no_grad():
            target = F.log_softmax(self.reference(input_ids=input_ids).logits.float(), dim=-1)
        log_q = F.log_softmax(self.model(input_ids=input_ids).logits.float(), dim=-1)
        return F.kl_div(log_q.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")

    def penalty(self) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.beta * self.divergence(next(self.batches)["input_ids"].to(device))
