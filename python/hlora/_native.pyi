"""Type stubs for the Rust extension ``hlora._native`` (PyO3). Use :mod:`hlora.ops` instead:
it adds autograd, NumPy results, version bumps and the plain-PyTorch fallback."""

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

_Array = Union[torch.Tensor, np.ndarray]

__version__: str

def accumulate_omega_(
    omega: _Array,
    a_prev: _Array,
    b_prev: _Array,
    grad_a: _Array,
    grad_b: _Array,
    a_next: _Array,
    b_next: _Array,
    *,
    lr: float,
    scaling: float,
    clamp_negative: bool = False,
) -> None: ...
def accumulate_omega_many_(
    omega: Sequence[_Array],
    a_prev: Sequence[_Array],
    b_prev: Sequence[_Array],
    grad_a: Sequence[_Array],
    grad_b: Sequence[_Array],
    a_next: Sequence[_Array],
    b_next: Sequence[_Array],
    *,
    lr: float,
    scaling: List[float],
    clamp_negative: bool = False,
) -> None: ...
def finalize_importance(
    omega: _Array,
    a: _Array,
    b: _Array,
    *,
    scaling: float,
    xi: float,
    clamp_negative: bool = True,
    a_start: Optional[_Array] = None,
    b_start: Optional[_Array] = None,
) -> torch.Tensor: ...
def layer_coefficients(norms: _Array, *, mode: str = "softmax", temperature: float = 1.0) -> torch.Tensor: ...
def importance_penalty(
    omega: _Array,
    a: _Array,
    b: _Array,
    a_ref: Optional[_Array] = None,
    b_ref: Optional[_Array] = None,
    *,
    scaling: float,
    scaling_ref: Optional[float] = None,
    weight: float = 1.0,
    compute_grads: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]: ...
def importance_penalty_many(
    omega: Sequence[_Array],
    a: Sequence[_Array],
    b: Sequence[_Array],
    a_ref: Optional[Sequence[_Array]] = None,
    b_ref: Optional[Sequence[_Array]] = None,
    *,
    scaling: List[float],
    scaling_ref: Optional[List[float]] = None,
    weights: Optional[List[float]] = None,
    compute_grads: bool = True,
) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]], List[Optional[torch.Tensor]]]: ...
def finalize_importance_many(
    omega: Sequence[_Array],
    a: Sequence[_Array],
    b: Sequence[_Array],
    a_start: Optional[Sequence[_Array]] = None,
    b_start: Optional[Sequence[_Array]] = None,
    *,
    scaling: List[float],
    xi: float,
    clamp_negative: bool = True,
) -> Tuple[List[torch.Tensor], torch.Tensor]: ...
def set_cpu_path(path: str, emulator: Optional[str] = None) -> None: ...
def cpu_path() -> str: ...
def simd_level() -> str: ...  # "avx512", "avx2" or "plain"
def set_cuda_path(path: str) -> None: ...
def cuda_path() -> str: ...
def cuda_compile(arch: str) -> int: ...
def cuda_cubin(arch: str) -> Tuple[int, str, Optional[str]]: ...
def cuda_status(device: int) -> str: ...
def cuda_size_defines() -> List[str]: ...
def torch_version() -> Optional[str]: ...  # the torch the tch provider was built for; None without it
def providers() -> Tuple[List[str], str]: ...  # (built in, "tch" first when present; in use)
def set_provider(name: str) -> None: ...  # "tch" or "view"
def cuda_unavailable(device: int) -> Optional[str]: ...  # None when CUDA tensors there run natively
def num_threads() -> int: ...
def cpu_threading() -> str: ...
