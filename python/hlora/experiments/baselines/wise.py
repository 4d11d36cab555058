"""WiSE-FT for adapters: the weight change interpolated between two adapters after training,
ΔW = ΔW_start + m·(ΔW_end − ΔW_start) (start None: the base model, ΔW = m·ΔW_end), evaluated
with the interpolation merged into the base weights and the adapter switched off. Free: no
training, one evaluation per m."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Tuple

import torch

from hlora import _checks as check
from hlora.adapters import find_adapted, unwrap

State = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


@contextlib.contextmanager
def interpolated(model, start: Optional[State], end: State, m: float) -> Iterator[None]:
    """``model`` (a PEFT model) computing with ΔW interpolated at ``m`` ∈ [0, 1] inside the block;
    its base weights are restored exactly after it."""
    m = check.non_negative(m, "m")
    if m > 1:
        raise ValueError(f"m must be in [0, 1] (0: the start adapter, 1: the end adapter), got {m}")
    modules = dict(unwrap(model).named_modules())
    saved = {}
    try:
        with torch.no_grad():
            for matrix in find_adapted(model):
                module = modules[matrix.name]
                weight = module.base_layer.weight
                saved[matrix.name] = weight.detach().clone()
                a_end, b_end = end[matrix.name]
                delta = m * (b_end.double() @ a_end.double())
                if start is not None:
                    a_start, b_start = start[matrix.name]
                    delta += (1 - m) * (b_start.double() @ a_start.double())
                delta *= matrix.scaling
                if getattr(module, "fan_in_fan_out", False):  # GPT-2's Conv1D stores W as (in, out)
                    delta = delta.T
                weight.add_(delta.to(weight.device, weight.dtype))
        with model.disable_adapter():
            yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                modules[name].base_layer.weight.copy_(weight)
