"""The hierarchical penalty for domain fine-tuning (Eq. 14–16):
``φ · Σ_l c_l · Σ_ij Ω_l,ij (W_l − W_l^ref)_ij²`` over every adapted matrix, in one fused call."""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from hlora import _checks as check
from hlora import _sharding, ops
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
        self.matrices = find_adapted(model, adapter)
        #: The process group FSDP2 shards the factors over (None: every rank has whole factors).
        self.group = _sharding.group_of([m.rows for m in self.matrices])
        if self.group is not None and not importance.is_sharded:
            importance = importance.shard_for(model, adapter)  # this rank's rows of a whole Ω
        # The reference factors matter only as the anchor (anchor "zero" reads none of them).
        importance.check(model, adapter, references=False)
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
        # ‖Ω_l‖ over the whole matrix: under FSDP2 the ranks' sums of squares added up.
        squares = torch.tensor([float(torch.linalg.vector_norm(om.double()) ** 2) for om in self.omegas],
                               dtype=torch.float64)
        norms = _sharding.all_sum(squares, self.group).sqrt()
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
        # What rebuilt_for needs: the importance as given and the options as resolved.
        self._importance = importance
        self._options = dict(phi=phi, layer_weighting=layer_weighting, temperature=temperature, adapter=adapter,
                             anchor=self.anchor, omega_dtype=omega_dtype)

    def uses_parameters_of(self, model: torch.nn.Module) -> bool:
        """Whether the factors this penalty differentiates are ``model``'s parameters."""
        params = {id(p) for p in model.parameters()}
        return all(id(m.a) in params and id(m.b) in params for m in self.matrices)

    def rebuilt_for(self, model: torch.nn.Module) -> Regularizer:
        """The same penalty (importance, φ, weighting, anchor) on ``model``'s current parameters.

        For a model whose parameters were replaced after this Regularizer was built: accelerate's
        FSDP2 ``prepare`` (``Trainer`` with ``fsdp_config={"version": 2}``) swaps every parameter
        for a sharded DTensor, and the penalty then follows each rank's rows."""
        return Regularizer(model, self._importance, **self._options)

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
        device = self.matrices[0].a.device
        whole_a, _ = _sharding.gathered_many([m.a for m in self.matrices])
        factors = [(a.detach(), _sharding.local_data(m.b)) for m, a in zip(self.matrices, whole_a)]
        def same(ref: torch.Tensor, x: torch.Tensor) -> bool:  # False for another rank than the recorded one
            return ref.shape == x.shape and torch.equal(ref.to(x.device, x.dtype), x)

        continued = bool(refs) and all(m.name in refs and same(refs[m.name][0], a) and same(refs[m.name][1], b)
                                       for m, (a, b) in zip(self.matrices, factors))
        if _sharding.all_true(continued, self.group, device):  # every rank decides alike
            return "reference"
        if _sharding.all_true(all(not bool(b.any()) for _, b in factors), self.group, device):
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
        """φ·Σ_l c_l·P_l as a 0-d tensor, differentiable w.r.t. every LoRA factor.

        Under FSDP2 it is this rank's part — the sum over the rows it holds, from its rows of B and
        the whole A — so a backward on every rank gives each factor the gradient of the whole
        penalty (A's partial gradients are summed over the ranks on the way back); :meth:`total`
        adds the parts up for reporting."""
        self._follow_model()
        a = _sharding.gathered_differentiable([m.a for m in self.matrices])  # one collective for all
        b = [_sharding.local(m.b) for m in self.matrices]
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

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """A :meth:`penalty` value summed over the ranks (itself when not sharded; a collective
        under FSDP2: every rank calls it). For reporting: it carries no gradient."""
        return _sharding.all_sum(value.detach().reshape(1).double(), self.group)[0].to(value.dtype)

    @property
    def last_value(self) -> Optional[float]:
        """The value of the last :meth:`penalty` call (read on demand: on a GPU, reading it
        waits for the kernel, so training steps do not)."""
        return None if self._last is None else float(self._last)
