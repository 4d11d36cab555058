"""Argument checks for the plain-PyTorch path, with the messages the native kernels give."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

FACTOR_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
OMEGA_DTYPES = (torch.float64, torch.float32)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(x: object, name: str, dtypes: Sequence[torch.dtype]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}; pass {name}.to_dense()")
    if x.dtype not in dtypes:
        raise TypeError(
            f"{name} must have dtype {_dtype_names(dtypes)}, got {str(x.dtype).replace('torch.', '')}"
        )
    return x


def matrix(x: torch.Tensor, name: str) -> tuple:
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {list(x.shape)}")
    return tuple(x.shape)


def shape(x: torch.Tensor, name: str, rows: int, cols: int, why: str) -> None:
    got = matrix(x, name)
    if got != (rows, cols):
        raise ValueError(f"{name} must have shape ({rows}, {cols}) {why}, got ({got[0]}, {got[1]})")


def factors(omega_name: str, omega: torch.Tensor, a_name: str, a: torch.Tensor,
            b_name: str, b: torch.Tensor) -> tuple:
    """(out, in, r) for omega (out, in), a (r, in), b (out, r)."""
    out, inn = matrix(omega, omega_name)
    rank, a_in = matrix(a, a_name)
    if a_in != inn or rank == 0:
        raise ValueError(
            f"{a_name} must have shape (r, {inn}) with r >= 1 for {omega_name} (out, {inn}), "
            f"got ({rank}, {a_in})"
        )
    shape(b, b_name, out, rank, f"(out, r) for {omega_name} (out, in) and A (r, in)")
    return out, inn, rank


def factor_set(omega_name: str, omega: torch.Tensor, omega_dtypes: Sequence[torch.dtype], a: torch.Tensor,
               b: torch.Tensor, pair_names: tuple, pair: tuple) -> torch.dtype:
    """Ω or ω (out, in), A (r, in), B (out, r) and an optional second pair of the same shapes (start or
    reference factors): dtypes, shapes, one device. Returns the compute dtype."""
    tensor(omega, omega_name, omega_dtypes)
    tensor(a, "a", FACTOR_DTYPES)
    tensor(b, "b", FACTOR_DTYPES)
    out, inn, rank = factors(omega_name, omega, "a", a, "b", b)
    named = [(omega_name, omega), ("a", a), ("b", b)]
    if pair_given(pair[0], pair[1], f"{pair_names[0]} and {pair_names[1]}"):
        tensor(pair[0], pair_names[0], FACTOR_DTYPES)
        tensor(pair[1], pair_names[1], FACTOR_DTYPES)
        shape(pair[0], pair_names[0], rank, inn, "like a")
        shape(pair[1], pair_names[1], out, rank, "like b")
        named += [(pair_names[0], pair[0]), (pair_names[1], pair[1])]
    same_device(named)
    return compute_dtype(*(t for _, t in named))


def same_device(named: Sequence[tuple]) -> None:
    first_name, first = named[0]
    for name, t in named:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )


def number(x: object, name: str) -> float:
    """A real number as a float: Python and NumPy scalars, one-element tensors — not bools,
    strings or complex numbers, which ``float()`` would accept or mangle."""
    if type(x) is float:  # the usual case first: this runs on every kernel call (~1 µs saved)
        return x
    if x is None or isinstance(x, (bool, np.bool_, str, bytes, complex, np.complexfloating)):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    if (isinstance(x, torch.Tensor) and (x.dtype == torch.bool or x.is_complex())) or (
            isinstance(x, np.ndarray) and x.dtype.kind not in "iuf"):
        raise TypeError(f"{name} must be a number, got a {x.dtype} {type(x).__name__}")
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        shape = f" of shape {list(x.shape)}" if isinstance(x, (torch.Tensor, np.ndarray)) else ""
        raise TypeError(f"{name} must be a number, got {type(x).__name__}{shape}") from None


def non_negative(x: object, name: str) -> float:
    """A finite real number ≥ 0 (a penalty weight): TypeError for what is not a number (bools
    included), ValueError for a negative or non-finite one."""
    value = number(x, name)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    return value


def positive(x: object, name: str) -> float:
    """A finite real number > 0 (ξ, a temperature)."""
    value = number(x, name)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    return value


def count(x: object, name: str, minimum: int = 1) -> int:
    """A whole number ≥ ``minimum`` (a batch size, a block length): Python or NumPy integers —
    not bools or floats, which would be truncated or taken as 0/1 without a word."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return int(x)


def numbers(x: object, name: str) -> List[float]:
    """One number, or a list/tuple/1-D array or tensor of them (one per matrix), as floats."""
    if isinstance(x, (list, tuple)) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 1):
        return [number(v, f"{name}[{i}]") for i, v in enumerate(x)]
    return [number(x, name)]


def disjoint(written: Sequence[tuple], read: Sequence[tuple]) -> None:
    """Refuses in-place targets (``written``: (name, tensor) pairs) that share memory with each
    other or with an input: the kernels read inputs while writing the targets. Like torch's own
    in-place ops, reports only overlaps that are certain: a shared first element, or two
    contiguous tensors whose byte ranges intersect. (The native module's ``view::disjoint``.)
    A target whose own elements share memory is refused too (``view::arg``)."""
    for name, t in written:
        if isinstance(t, torch.Tensor) and overlaps_itself(t):
            raise ValueError(f"{name} is updated in place, but some of its elements share memory (an expand()ed "
                             f"or as_strided view?); pass {name}.clone()")
    spans = []
    for is_written, group in ((True, written), (False, read)):
        for name, t in group:
            if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.data_ptr() == 0:
                continue  # (non-tensors are refused by the other checks; meta tensors have no memory)
            lo = t.data_ptr()
            # A non-contiguous tensor is represented by its first element alone.
            hi = lo + t.numel() * t.element_size() if t.is_contiguous() else lo + 1
            spans.append((lo, not is_written, hi, name))
    # In address order (one space: CUDA's unified addressing keeps device memory apart from host
    # memory), each span against the furthest-reaching written span before it, and a written
    # span against the furthest-reaching span of any kind before it.
    spans.sort(key=lambda x: (x[0], x[1]))
    reach_written: Optional[tuple] = None
    reach_any: Optional[tuple] = None
    for lo, is_read, hi, name in spans:
        if reach_written is not None and lo < reach_written[0]:
            _overlap(reach_written[1], name)
        if not is_read and reach_any is not None and lo < reach_any[0]:
            _overlap(name, reach_any[1])
        if not is_read and (reach_written is None or hi > reach_written[0]):
            reach_written = (hi, name)
        if reach_any is None or hi > reach_any[0]:
            reach_any = (hi, name)


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two indices of matrix ``t`` address one element: a stride of 0 along more than one
    element, or steps di·s₀ = dj·s₁ within the matrix (the smallest being s₁/g rows against s₀/g
    columns, g = gcd). Other ranks are refused elsewhere, by shape. (The native ``overlaps_itself``.)"""
    if t.dim() != 2 or t.numel() == 0:
        return False
    (n0, n1), (s0, s1) = t.shape, t.stride()
    if (n0 > 1 and s0 == 0) or (n1 > 1 and s1 == 0):
        return True
    if n0 < 2 or n1 < 2:
        return False
    g = math.gcd(s0, s1)
    return s1 // g < n0 and s0 // g < n1


def _overlap(target: str, other: str) -> None:
    raise ValueError(f"{target} shares memory with {other}, and {target} is written in place; "
                     f"pass separate tensors (e.g. {other}.clone())")


def finite(x: object, name: str) -> float:
    v = number(x, name)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


def flag(x: object, name: str) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(x).__name__}")
    return bool(x)


def pair_given(a: Optional[torch.Tensor], b: Optional[torch.Tensor], names: str) -> bool:
    if (a is None) != (b is None):
        raise ValueError(f"{names} must be given together (or neither, for a fresh adapter)")
    return a is not None


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64, else float32 (DESIGN §1)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def differences(was: Dict, now: Dict) -> List[str]:
    """``"key old → new"`` for every setting that differs (runs and checkpoints resumed)."""
    return [f"{k} {was.get(k)!r} → {now.get(k)!r}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
