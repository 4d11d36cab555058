"""The four kernels of DESIGN §2, dispatched to the native Rust backend (or to
:mod:`hlora.reference` when the backend is ``torch``), with the penalty wrapped in an
``autograd.Function`` whose forward runs one fused kernel that also returns the analytic
gradients.

Inputs may be torch tensors (CPU or CUDA) or, on the CPU, NumPy float32/float64 arrays (read and
written in place, zero-copy); results for NumPy inputs come back as NumPy arrays — except a penalty
whose factors are tensors autograd tracks, which stays a differentiable tensor.
"""

from __future__ import annotations

import warnings
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from hlora import _checks as check
from hlora import reference
from hlora._loader import NATIVE, runs_on_reference

Array = Union[torch.Tensor, np.ndarray]
Scalars = Union[float, Sequence[float]]

__all__ = [
    "accumulate_omega_",
    "accumulate_omega_many_",
    "finalize_importance",
    "finalize_importance_many",
    "layer_coefficients",
    "importance_penalty",
    "importance_penalty_many",
]


def _torch_view(x: Any, name: str = "array", written: bool = False) -> Any:
    """NumPy arrays as zero-copy tensors, for the plain-PyTorch backend — with the native
    module's checks, so both backends refuse the same arrays with the same errors."""
    if not isinstance(x, np.ndarray):
        return x
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be a float32 or float64 numpy array, got dtype {x.dtype}")
    if any(st < 0 for st in x.strides) or not x.flags.aligned:
        raise ValueError(f"{name} has negative or unaligned strides; pass numpy.ascontiguousarray({name})")
    if written and not x.flags.writeable:
        raise ValueError(f"{name}: numpy array is read-only, and it is updated in place")
    if not x.flags.writeable:
        with warnings.catch_warnings():  # torch warns on read-only arrays; this one is only read
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(x)
    return torch.from_numpy(x)


#: Argument names of the ω update and of the penalty, in call order (for the reference backend's
#: NumPy checks, which name the argument they refuse).
_OMEGA_ARGS = ("omega", "a_prev", "b_prev", "grad_a", "grad_b", "a_next", "b_next")
_PENALTY_ARGS = ("Omega", "a", "b", "a_ref", "b_ref")


def _first(v: Any) -> Any:
    """A ``_many`` op's first matrix (its device is the call's), or None."""
    return v[0] if isinstance(v, (list, tuple)) and v else None


def _bump_version(t: Any) -> None:
    # The native kernels write through raw pointers; tell autograd the tensor changed.
    if isinstance(t, torch.Tensor):
        torch.autograd.graph.increment_version(t)


def accumulate_omega_(
    omega: Array,
    a_prev: Array,
    b_prev: Array,
    grad_a: Array,
    grad_b: Array,
    a_next: Array,
    b_next: Array,
    *,
    lr: float,
    scaling: float,
    clamp_negative: bool = False,
) -> Array:
    """ω ← ω − g~ ⊙ dθ (Eq. 11–12) for one optimizer step, in place; returns ``omega``.

    ``a_prev, b_prev`` are the factors before the step, ``grad_a, grad_b`` their gradients as
    the optimizer saw them, ``a_next, b_next`` the factors after it, ``lr`` the step's learning
    rate and ``scaling`` PEFT's ``s``. ``clamp_negative`` clamps the running ω at 0 (the
    authors' code).
    """
    if runs_on_reference(omega):
        args = [_torch_view(x, name, written=name == "omega")
                for x, name in zip((omega, a_prev, b_prev, grad_a, grad_b, a_next, b_next), _OMEGA_ARGS)]
        reference.accumulate_omega_(*args, lr=lr, scaling=scaling, clamp_negative=clamp_negative)
        return omega
    NATIVE.accumulate_omega_(omega, a_prev, b_prev, grad_a, grad_b, a_next, b_next,
                             lr=check.number(lr, "lr"), scaling=check.number(scaling, "scaling"),
                             clamp_negative=clamp_negative)
    _bump_version(omega)
    return omega


def accumulate_omega_many_(
    omega: Sequence[Array],
    a_prev: Sequence[Array],
    b_prev: Sequence[Array],
    grad_a: Sequence[Array],
    grad_b: Sequence[Array],
    a_next: Sequence[Array],
    b_next: Sequence[Array],
    *,
    lr: float,
    scaling: Scalars,
    clamp_negative: bool = False,
) -> List[Array]:
    """:func:`accumulate_omega_` for every adapted matrix of a model in one call.

    Each argument is a list with one entry per matrix; ``scaling`` is one number or one per
    matrix.
    """
    if runs_on_reference(_first(omega)):
        lists = [[_torch_view(x, n, written=n == "omega") for x in _as_list(v, n)] for v, n in zip(
            (omega, a_prev, b_prev, grad_a, grad_b, a_next, b_next), _OMEGA_ARGS)]
        reference.accumulate_omega_many_(*lists, lr=lr, scaling=scaling, clamp_negative=clamp_negative)
        return list(omega)
    NATIVE.accumulate_omega_many_(omega, a_prev, b_prev, grad_a, grad_b, a_next, b_next,
                                  lr=check.number(lr, "lr"), scaling=check.numbers(scaling, "scaling"),
                                  clamp_negative=clamp_negative)
    for t in omega:
        _bump_version(t)
    return list(omega)


def _as_list(v: Any, name: str) -> list:
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors")
    return list(v)


def _torch_views(v: Any, name: str) -> Optional[list]:
    """A list argument of a ``_many`` op with its NumPy entries viewed as tensors (for the
    plain-PyTorch backend), each named by its index."""
    return None if v is None else [_torch_view(x, f"{name}[{i}]") for i, x in enumerate(_as_list(v, name))]


def _all_numpy(v: Any) -> bool:
    """Whether a ``_many`` op's ω/Ω list is all NumPy arrays: then its results come back as NumPy,
    as the single-matrix ops' do."""
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, np.ndarray) for x in v)


def finalize_importance(
    omega: Array,
    a: Array,
    b: Array,
    *,
    scaling: float,
    xi: float,
    clamp_negative: bool = True,
    a_start: Optional[Array] = None,
    b_start: Optional[Array] = None,
) -> Array:
    """Ω = ω / (Δ² + ξ) (Eq. 13) as a new tensor of ω's dtype; ω is unchanged.

    Δ = s·B·A − s·B_start·A_start (``a_start``/``b_start``: the adapter at the start of the
    general task; omit both for a fresh adapter, Δ = s·B·A). Negative entries are clamped to 0
    unless ``clamp_negative=False``.

    The native kernels form Δ in float64 whatever the factors: Ω magnifies Δ's rounding where
    Δ² ≲ ξ, and with a small ξ (the authors' 1e-9) those entries dominate Ω — float32 maths (the
    ``torch`` backend's) errs there by up to ~3e-4 of ‖Ω‖, float64 by ~1e-7.
    """
    if runs_on_reference(omega):
        result = reference.finalize_importance(
            _torch_view(omega, "omega"), _torch_view(a, "a"), _torch_view(b, "b"), scaling=scaling, xi=xi,
            clamp_negative=clamp_negative, a_start=_torch_view(a_start, "a_start"),
            b_start=_torch_view(b_start, "b_start"))
    else:
        result = NATIVE.finalize_importance(omega, a, b, scaling=check.number(scaling, "scaling"),
                                            xi=check.number(xi, "xi"), clamp_negative=clamp_negative,
                                            a_start=a_start, b_start=b_start)
    return result.numpy() if isinstance(omega, np.ndarray) else result


def finalize_importance_many(
    omega: Sequence[Array],
    a: Sequence[Array],
    b: Sequence[Array],
    a_start: Optional[Sequence[Array]] = None,
    b_start: Optional[Sequence[Array]] = None,
    *,
    scaling: Scalars,
    xi: float,
    clamp_negative: bool = True,
) -> Tuple[List[Array], Array]:
    """:func:`finalize_importance` over lists of matrices (one launch on CUDA), plus the
    Frobenius norms ‖Ω_l‖ (float64, on Ω's device) that :func:`layer_coefficients` takes —
    computed in the same pass over ω on CUDA. NumPy ω in, NumPy Ω and norms out."""
    if runs_on_reference(_first(omega)):
        args = [_torch_views(v, name) for v, name in
                zip((omega, a, b, a_start, b_start), ("omega", "a", "b", "a_start", "b_start"))]
        results, norms = reference.finalize_importance_many(*args, scaling=scaling, xi=xi,
                                                            clamp_negative=clamp_negative)
    else:
        results, sq_norms = NATIVE.finalize_importance_many(
            _as_list(omega, "omega"), _as_list(a, "a"), _as_list(b, "b"),
            None if a_start is None else _as_list(a_start, "a_start"),
            None if b_start is None else _as_list(b_start, "b_start"),
            scaling=check.numbers(scaling, "scaling"), xi=check.number(xi, "xi"), clamp_negative=clamp_negative)
        norms = sq_norms.sqrt()
    if _all_numpy(omega):
        return [r.numpy() for r in results], norms.numpy()
    return results, norms


def layer_coefficients(norms: Array, *, mode: str = "softmax", temperature: float = 1.0) -> Array:
    """Layer coefficients c_l (Eq. 15): ``softmax(norms / temperature)`` computed stably, or
    ``1/L`` each with ``mode="uniform"``. float64 for float64 norms, else float32."""
    if NATIVE is None:
        result = reference.layer_coefficients(_torch_view(norms, "norms"), mode=mode, temperature=temperature)
    elif isinstance(norms, torch.Tensor) and norms.device.type != "cpu":
        # L numbers: computed on the host, returned on the norms' device.
        result = NATIVE.layer_coefficients(norms.detach().cpu(), mode=mode,
                                           temperature=check.number(temperature, "temperature")).to(norms.device)
    else:
        result = NATIVE.layer_coefficients(norms, mode=mode, temperature=check.number(temperature, "temperature"))
    return result.numpy() if isinstance(norms, np.ndarray) else result


def _backward(ctx: Any, grad_out: torch.Tensor) -> List[Optional[torch.Tensor]]:
    """∂P/∂(factor) · grad_out for the factors autograd asks for. (The engine casts each result to
    its factor's dtype.)"""
    saved: Sequence[Optional[torch.Tensor]] = ctx.grads
    if torch.is_grad_enabled():
        # create_graph=True: the kernel's gradients are constants, whose derivative would be a
        # silent zero. Recompute them as differentiable torch ops (a rare, slower path) so
        # second derivatives — Hessian-vector products, gradient penalties — are right.
        saved = ctx.differentiable_grads(*ctx.inputs)
    needed = ctx.needs_input_grad[ctx.first_factor:]
    wanted = [g if need else None for g, need in zip(saved, needed)]
    if torch.is_grad_enabled() or len(wanted) <= 2 or not grad_out.is_cuda:
        return [None if g is None else grad_out * g for g in wanted]
    return _scaled_together(wanted, grad_out, ctx.factor_dtypes)


def _scaled_together(grads: Sequence[Optional[torch.Tensor]], grad_out: torch.Tensor,
                     dtypes: Sequence[torch.dtype]) -> List[Optional[torch.Tensor]]:
    """``grad_out * g`` cast to its factor's dtype for every g, as one multiplication and one
    cast per (device, dtype) group instead of two per factor. For GPUs: there every elementwise
    op is a launch, ~30 µs of CPU time per factor for the two (H200 host, profiled), and a model
    has ~100 factors; views cost no launch. On a CPU the per-factor ops are cheaper (measured)."""
    out: List[Optional[torch.Tensor]] = [None] * len(grads)
    groups: dict = {}
    for i, g in enumerate(grads):
        if g is not None:
            groups.setdefault((g.device, g.dtype, dtypes[i]), []).append(i)
    for (_, _, dtype), idx in groups.items():
        flat = (torch.cat([grads[i].reshape(-1) for i in idx]) * grad_out).to(dtype)  # type: ignore[union-attr]
        for i, part in zip(idx, flat.split([grads[i].numel() for i in idx])):  # type: ignore[union-attr]
            out[i] = part.view(grads[i].shape)  # type: ignore[union-attr]
    return out


class _FusedPenalty(torch.autograd.Function):
    """Forward: one native pass over Ω returning P and (when needed) ∂P/∂A, ∂P/∂B.
    Backward: scales those gradients by the incoming gradient."""

    @staticmethod
    def forward(ctx, omega, a, b, a_ref, b_ref, scaling, scaling_ref):  # type: ignore[override]
        need = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        value, grad_a, grad_b = NATIVE.importance_penalty(
            omega, a, b, a_ref, b_ref, scaling=scaling, scaling_ref=scaling_ref, compute_grads=need)
        # Fresh tensors of our own, neither inputs nor outputs: kept on ctx directly (no
        # save_for_backward bookkeeping). The inputs too, for the create_graph=True path only.
        ctx.grads = (grad_a, grad_b)
        ctx.first_factor = 1
        ctx.inputs = (omega, a, b, a_ref, b_ref, scaling, scaling_ref)
        ctx.differentiable_grads = reference._penalty_grads
        return value

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        return (None, *_backward(ctx, grad_out), None, None, None, None)


def importance_penalty(
    Omega: Array,
    a: Array,
    b: Array,
    a_ref: Optional[Array] = None,
    b_ref: Optional[Array] = None,
    *,
    scaling: float,
    scaling_ref: Optional[float] = None,
) -> Array:
    """P = Σ Ω ⊙ D² with D = s·B·A − s_ref·B_ref·A_ref (Eq. 14), a 0-d tensor differentiable
    w.r.t. ``a`` and ``b``. Without reference factors D = s·B·A (a fresh adapter on the merged
    model). ``scaling_ref`` defaults to ``scaling``; when it differs, the kernels evaluate
    D = (s·B − s_ref·B_ref)·A + s_ref·B_ref·(A − A_ref) with the first factor formed in float64 as
    s·(B − B_ref) + (s − s_ref)·B_ref, so nearly equal scalings do not cancel."""
    inputs = (Omega, a, b, a_ref, b_ref)
    # NumPy in, NumPy out — unless a factor is a tensor that autograd tracks: then the arrays are
    # viewed as tensors and the result keeps its graph (a detached value would drop the
    # penalty's gradient without a word).
    tracked = _tracked(a, b)
    numpy_result = isinstance(Omega, np.ndarray) and not tracked
    if runs_on_reference(Omega):
        args = [_torch_view(x, name) for x, name in zip(inputs, _PENALTY_ARGS)]
        result = reference.importance_penalty(*args, scaling=scaling, scaling_ref=scaling_ref)
        return result.detach().numpy() if numpy_result else result
    s = check.number(scaling, "scaling")
    s_ref = None if scaling_ref is None else check.number(scaling_ref, "scaling_ref")
    if any(isinstance(x, np.ndarray) for x in inputs):
        if not tracked:
            result, _, _ = NATIVE.importance_penalty(*inputs, scaling=s, scaling_ref=s_ref, compute_grads=False)
            return result.numpy() if numpy_result else result
        inputs = tuple(_torch_view(x, name) for x, name in zip(inputs, _PENALTY_ARGS))
    return _FusedPenalty.apply(*inputs, s, s_ref)


def _tracked(*tensors: Any) -> bool:
    """Whether autograd would differentiate through any of these."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class _FusedPenaltyMany(torch.autograd.Function):
    """Σ_l w_l·P_l over all matrices in one native call; inputs flattened as
    (Omega..., a..., b..., a_ref..., b_ref...)."""

    @staticmethod
    def forward(ctx, n, has_ref, scaling, scaling_ref, weights, *tensors):  # type: ignore[override]
        om, a, b = tensors[:n], tensors[n:2 * n], tensors[2 * n:3 * n]
        a_ref, b_ref = (tensors[3 * n:4 * n], tensors[4 * n:5 * n]) if has_ref else (None, None)
        need = any(ctx.needs_input_grad[5 + n:5 + 3 * n])
        value, grads_a, grads_b = NATIVE.importance_penalty_many(
            list(om), list(a), list(b), None if a_ref is None else list(a_ref),
            None if b_ref is None else list(b_ref), scaling=scaling, scaling_ref=scaling_ref,
            weights=weights, compute_grads=need)
        ctx.grads = (*grads_a, *grads_b) if need else (None,) * (2 * n)
        ctx.factor_dtypes = [t.dtype for t in tensors[n:3 * n]]
        ctx.first_factor = 5 + n
        ctx.n_refs = len(tensors) - 3 * n
        ctx.inputs = (n, has_ref, scaling, scaling_ref, weights, tensors)
        ctx.differentiable_grads = _many_penalty_grads
        return value

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        n_omega = ctx.first_factor - 5
        return (None,) * 5 + (None,) * n_omega + (*_backward(ctx, grad_out),) + (None,) * ctx.n_refs


def _many_penalty_grads(n: int, has_ref: bool, scaling: List[float], scaling_ref: Optional[List[float]],
                        weights: Optional[List[float]], tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """(∂/∂a..., ∂/∂b...) of Σ_l w_l·P_l as differentiable torch ops (the create_graph=True path)."""
    scalings = reference._per_matrix(scaling, "scaling", n)
    scalings_ref = reference._per_matrix(scaling_ref, "scaling_ref", n) or [None] * n
    w = reference._per_matrix(weights, "weights", n) or [1.0] * n
    grads = []
    for i in range(n):
        refs = (tensors[3 * n + i], tensors[4 * n + i]) if has_ref else (None, None)
        ga, gb = reference._penalty_grads(tensors[i], tensors[n + i], tensors[2 * n + i], *refs,
                                          scalings[i], scalings_ref[i])
        grads.append((w[i] * ga, w[i] * gb))
    return [g[0] for g in grads] + [g[1] for g in grads]


def importance_penalty_many(
    Omega: Sequence[Array],
    a: Sequence[Array],
    b: Sequence[Array],
    a_ref: Optional[Sequence[Array]] = None,
    b_ref: Optional[Sequence[Array]] = None,
    *,
    scaling: Scalars,
    scaling_ref: Optional[Scalars] = None,
    weights: Optional[Scalars] = None,
) -> Array:
    """Σ_l w_l · P_l over every adapted matrix in one call (one entry per matrix in each list;
    ``scaling``, ``scaling_ref`` and ``weights`` one number or one per matrix; w_l = 1 unless
    given — the Regularizer passes φ·c_l). Differentiable w.r.t. every ``a[l]`` and ``b[l]``.
    NumPy Ω in, a NumPy 0-d array out — unless a factor is a tensor autograd tracks."""
    if runs_on_reference(_first(Omega)):
        conv = [_torch_views(v, name) for v, name in zip((Omega, a, b, a_ref, b_ref), _PENALTY_ARGS)]
        result = reference.importance_penalty_many(*conv, scaling=scaling, scaling_ref=scaling_ref, weights=weights)
        numpy_result = _all_numpy(Omega) and not _tracked(*_as_list(a, "a"), *_as_list(b, "b"))
        return result.detach().numpy() if numpy_result else result
    om, av, bv = _as_list(Omega, "Omega"), _as_list(a, "a"), _as_list(b, "b")
    n = len(om)
    if n == 0:
        raise ValueError("Omega must hold at least one matrix")
    for name, v in (("a", av), ("b", bv)):
        if len(v) != n:
            raise ValueError(f"{name} has {len(v)} entries, expected {n} (one per matrix)")
    if (a_ref is None) != (b_ref is None):
        raise ValueError("a_ref and b_ref must be given together (or neither, for fresh adapters)")
    refs: list = []
    if a_ref is not None:
        refs = _as_list(a_ref, "a_ref") + _as_list(b_ref, "b_ref")
        if len(refs) != 2 * n:
            raise ValueError(f"a_ref and b_ref must have {n} entries each (one per matrix)")
    tensors = [*om, *av, *bv, *refs]
    scalings = check.numbers(scaling, "scaling")
    scalings_ref = None if scaling_ref is None else check.numbers(scaling_ref, "scaling_ref")
    w = None if weights is None else check.numbers(weights, "weights")
    if any(isinstance(t, np.ndarray) for t in tensors):
        if not _tracked(*av, *bv):
            value, _, _ = NATIVE.importance_penalty_many(om, av, bv, a_ref, b_ref, scaling=scalings,
                                                         scaling_ref=scalings_ref, weights=w, compute_grads=False)
            return value.numpy() if _all_numpy(om) else value
        # Arrays beside tracked factors: viewed as tensors, so the penalty keeps its gradient.
        groups = (om, av, bv, refs[:n], refs[n:])
        tensors = [t for group, name in zip(groups, _PENALTY_ARGS) for t in _torch_views(group, name)]
    return _FusedPenaltyMany.apply(n, bool(refs), scalings, scalings_ref, w, *tensors)
