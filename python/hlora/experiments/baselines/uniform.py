"""The "− element" ablation: HLoRA's penalty with every entry of Ω one constant — a plain L2 pull
toward the reference weights — with or without HLoRA's layer coefficients."""

from __future__ import annotations

import torch

from hlora import ops
from hlora.importance import Importance


def uniform_importance(importance: Importance, layer_coefficients: bool) -> Importance:
    """Ω ≡ the global mean of the recorded Ω (so Σ Ω, and with it the meaning of φ, is kept), for
    ``Regularizer(..., layer_weighting="uniform")``. With ``layer_coefficients`` each matrix's
    constant is scaled by L·c_l, c_l = softmax(‖Ω_l‖ / mean ‖Ω‖) of the *recorded* Ω (Eq. 15, the
    temperature HLoRA uses by default): under the uniform 1/L weighting that is HLoRA's layer
    weighting without its element-wise part."""
    total = sum(float(om.double().sum()) for om in importance.matrices.values())
    count = sum(om.numel() for om in importance.matrices.values())
    mean = total / count
    scale = {name: 1.0 for name in importance.names}
    if layer_coefficients:
        norms = torch.tensor(list(importance.norms().values()), dtype=torch.float64)
        temperature = float(norms.mean()) if float(norms.mean()) > 0 else 1.0
        c = ops.layer_coefficients(norms, mode="softmax", temperature=temperature)
        scale = {name: len(importance.names) * float(c_l) for name, c_l in zip(importance.names, c)}
    matrices = {name: torch.full_like(om, mean * scale[name]) for name, om in importance.matrices.items()}
    return Importance(matrices, dict(importance.references), dict(importance.scalings),
                      {**importance.meta, "uniform": True, "layer_coefficients": layer_coefficients})
