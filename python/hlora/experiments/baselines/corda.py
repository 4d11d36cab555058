"""CorDA in its knowledge-preserved mode (Yang et al., 2024; PEFT ≥ 0.15): the adapter initialized
from the directions of each weight that the general text uses least — from the covariance of the
layer's inputs on that text — and the base weight left with the rest, so fine-tuning moves the
model where its general knowledge is not."""

from __future__ import annotations

import time

import torch


def corda_model(base: torch.nn.Module, calibration: torch.Tensor, *, r: int, alpha: int, targets: tuple):
    """``base`` (modified in place: CorDA moves the adapter's part out of the base weights) with a
    CorDA-KPM adapter built from ``calibration`` (general-text token blocks), and the seconds the
    preprocessing took."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))

    @torch.no_grad()
    def run_model() -> None:
        device = next(base.parameters()).device
        for sequence in calibration:  # one at a time: PEFT's covariance hook takes batches of one
            base(input_ids=sequence[None].to(device))

    start = time.perf_counter()
    preprocess_corda(base, config, run_model=run_model)
    model = get_peft_model(base, config)
    return model, time.perf_counter() - start
