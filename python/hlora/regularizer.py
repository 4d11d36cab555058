"""The hierarchical penalty for domain fine-tuning (Eq. 14–16):
``φ · Σ_l c_l · Σ_ij Ω_l,ij (W_l − W_l^ref)_ij²`` over every adapted matrix, in one fused call."""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from hlora import _checks as check
from hlora import ops
from hlora.adapters import find_adapted
from hlora.importance import Importance, cast_omega

#: φ. The pilot (DATA.md: SmolLM2, r=8, α=32, ξ=1e-3, T=mean‖Ω‖) found forgetting fully
#: prevented at 1e6, halved near 1e2–1e3 and domain learning kept up to ~1e3; 1e3 is that
#: middle. Ω's scale moves with ξ, s², η and the step count, so choose φ on validation data.
DEFAULT_PHI = 1e3
LAYER_WEIGHTINGS = ("softmax", "uniform")
ANCHORS = ("auto", "reference", "zero")


#: Ω storage dtypes the penalty kernels read (None: keep the recorded dtype).
OMEGA_STORAGE = (None, torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_regularizer_options(phi: object, layer_weighting: object, temperature: object, anchor: object,
                              omega_dtype: object = None) -> Tuple[float, Optional[float]]:
    """φ and the temperature as floats (None for ``"auto"``), after checking every option (also
    what the HF callback checks when it is made, before a Trainer runs)."""
    phi_value = check.non_negative(phi, "phi")
    if layer_weighting not in LAYER_WEIGHTINGS:
        raise ValueError(f'layer_weighting must be "softmax" or "uniform", got {layer_weighting!r}')
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    if omega_dtype not in OMEGA_STORAGE:
        raise TypeError(f"omega_dtype must be one of {OMEGA_STORAGE}, got {omega_dtype!r}")
    if isinstance(temperature, str):
        if temperature != "auto":
            raise ValueError(f'temperature must be "auto" or a positive number, got {temperature!r}')
        return phi_value, None
    return phi_value, check.positive(temperature, "temperature")


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) and B (out, r) with zero rows and columns up to ``rank`` (B·A unchanged;
    differentiable, so padded adapter factors keep their gradients)."""
    extra = rank - a.shape[0]
    if extra <= 0:
        return a, b
    return F.pad(a, (0, 0, 0, extra)), F.pad(b, (0, extra))


class Regularizer:
    """φ·Σ c_l·P_l for the model's current adapter against an :class:`Importance`.

    Args:
        model: the PEFT model being fine-tuned on the domain task.
        importance: Ω and the reference factors from the general task.
        phi: φ, the penalty's weight.
        layer_weighting: ``"softmax"`` (c = softmax(‖Ω_l‖/T), Eq. 15) or ``"uniform"`` (1/L,
            the "− layer" ablation).
        temperature: T of the softmax. ``"auto"`` (default) is the mean of ‖Ω_l‖: raw norms with
            T = 1 make the softmax one-hot (one matrix regularized, the others free); a number is
            used as given (T = 1e8 with ξ = 1e-9 reproduces the authors' code).
        anchor: what W^ref is. ``"reference"``: the reference factors (continuing the ν adapter,
            as the authors' code; P starts at 0). ``"zero"``: a fresh adapter on the merged ν model,
            D = s·B·A. ``"auto"``: ``"reference"`` when the adapter still equals the reference
            factors, ``"zero"`` when B is all zeros (a fresh adapter), else an error.
    """

    def __init__(self, model: torch.nn.Module, importance: Importance, *, phi: float = DEFAULT_PHI,
                 layer_weighting: str = "softmax", temperature: Union[str, float] = "auto",
                 adapter: str = "default", anchor: str = "auto",
                 omega_dtype: Optional[torch.dtype] = None) -> None:
        phi, fixed_temperature = check_regularizer_options(phi, layer_weighting, temperature, anchor, omega_dtype)
        if not isinstance(importance, Importance):
            raise TypeError(f"importance must be an hlora.Importance (ImportanceRecorder.finalize(), "
                            f"Importance.load(path)), got {type(importance).__name__}")
        # The reference factors matter only as the anchor (anchor "zero" reads none of them).
        importance.check(model, adapter, references=False)
        self.matrices = find_adapted(model, adapter)
        self.phi = phi
        self.layer_weighting = layer_weighting
        device = self.matrices[0].a.device
        self.omegas: List[torch.Tensor] = [importance.matrices[m.name].to(device) for m in self.matrices]
        self.anchor = self._resolve_anchor(anchor, importance)
        if self.anchor == "reference":
            importance.check(model, adapter)
            # The kernels take one rank: an adapter of another rank than the recorded one meets its
            # reference factors zero-padded to the larger (the products, and so D, are unchanged).
            refs = [importance.references[m.name] for m in self.matrices]
            self._rank_padding = [max(0, a_ref.shape[0] - m.a.shape[0]) for m, (a_ref, _) in zip(self.matrices, refs)]
            padded = [_pad_rank(a_ref.to(device, m.a.dtype), b_ref.to(device, m.b.dtype), m.a.shape[0])
                      for m, (a_ref, b_ref) in zip(self.matrices, refs)]
            self.a_ref = [a for a, _ in padded]
            self.b_ref = [b for _, b in padded]
            self.scaling_ref = [float(importance.scalings.get(m.name, m.scaling)) for m in self.matrices]
        norms = torch.tensor([float(torch.linalg.vector_norm(om.float())) for om in self.omegas], dtype=torch.float64)
        if omega_dtype is not None:
            self.omegas = [cast_omega(om, omega_dtype, m.name) for om, m in zip(self.omegas, self.matrices)]
        if not bool(norms.any()):
            warnings.warn("Ω is zero for every matrix (was any step recorded?): the penalty will be 0",
                          stacklevel=2)
        if fixed_temperature is None:  # "auto"
            mean = float(norms.mean())
            self.temperature = mean if mean > 0 else 1.0
        else:
            self.temperature = fixed_temperature
        self.coefficients: torch.Tensor = ops.layer_coefficients(norms, mode=layer_weighting,
                                                                 temperature=self.temperature)
        self._weights = [self.phi * float(c) for c in self.coefficients]
        self._last: Optional[torch.Tensor] = None

    def _follow_model(self) -> None:
        """Moves Ω and the reference factors to where the model now is. A Regularizer passed to
        HLoRATrainer is built before the Trainer moves the model to its GPU."""
        a = self.matrices[0].a
        if self.omegas[0].device == a.device and (self.anchor != "reference" or self.a_ref[0].dtype == a.dtype):
            return  # the usual case: one comparison per penalty
        self.omegas = [om.to(m.a.device) for om, m in zip(self.omegas, self.matrices)]
        if self.anchor == "reference":
            self.a_ref = [r.to(m.a.device, m.a.dtype) for r, m in zip(self.a_ref, self.matrices)]
            self.b_ref = [r.to(m.b.device, m.b.dtype) for r, m in zip(self.b_ref, self.matrices)]

    def _resolve_anchor(self, anchor: str, importance: Importance) -> str:
        if anchor != "auto":
            if anchor == "reference" and not importance.references:
                raise ValueError("anchor='reference' but the importance holds no reference factors")
            return anchor
        refs = importance.references
        if refs and all(torch.equal(refs[m.name][0].to(m.a.device, m.a.dtype), m.a.detach())  # False for another rank
                        and torch.equal(refs[m.name][1].to(m.b.device, m.b.dtype), m.b.detach())
                        for m in self.matrices):
            return "reference"
        if all(not bool(m.b.detach().any()) for m in self.matrices):
            return "zero"
        raise ValueError("cannot tell how the adapter relates to the importance's reference factors: "
                         "pass anchor='reference' (continue the general-task adapter) or anchor='zero' "
                         "(a fresh adapter on the merged model)")

    @property
    def names(self) -> List[str]:
        return [m.name for m in self.matrices]

    def coefficient_map(self) -> Dict[str, float]:
        return {m.name: float(c) for m, c in zip(self.matrices, self.coefficients)}

    def penalty(self) -> torch.Tensor:
        """φ·Σ_l c_l·P_l as a 0-d tensor, differentiable w.r.t. every LoRA factor."""
        self._follow_model()
        a = [m.a for m in self.matrices]
        b = [m.b for m in self.matrices]
        refs = {}
        if self.anchor == "reference":
            refs = {"a_ref": self.a_ref, "b_ref": self.b_ref, "scaling_ref": self.scaling_ref}
            if any(self._rank_padding):  # an adapter of lower rank than the recorded one
                padded = [_pad_rank(ai, bi, ai.shape[0] + extra) for ai, bi, extra in zip(a, b, self._rank_padding)]
                a, b = [ai for ai, _ in padded], [bi for _, bi in padded]
        value = ops.importance_penalty_many(self.omegas, a, b, scaling=[m.scaling for m in self.matrices],
                                            weights=self._weights, **refs)
        self._last = value.detach()
        return value

    @property
    def last_value(self) -> Optional[float]:
        """The value of the last :meth:`penalty` call (read on demand: on a GPU, reading it
        waits for the kernel, so training steps do not)."""
        return None if self._last is None else float(self._last)
