"""Chooses the backend once, at import: the native Rust kernels, or plain PyTorch — and, for the
native kernels, the provider that reads torch tensors.

``HLORA_BACKEND=rust`` insists on the native module (ImportError with the reason if it cannot
load), ``HLORA_BACKEND=torch`` forces the reference, and anything else tries native first and
warns once when it falls back.

Providers: ``view`` reads tensors through their Python attributes and works with any torch;
``tch`` (only in a build made against torch 2.11.0, which links libtorch) reads them through
libtorch and adds the tch path for CUDA tensors without NVRTC. A build that has ``tch`` uses it
when it runs with the torch it was built for. ``HLORA_PROVIDER=tch|view`` forces one.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Any, Dict, Optional, Tuple

import torch

PROVIDERS = ("tch", "view")


def _installed_torch() -> str:
    return torch.__version__.split("+")[0]


def _load_native() -> ModuleType:
    try:
        from hlora import _native  # noqa: PLC0415 — must follow `import torch` (libtorch's symbols)
    except ImportError as err:
        if "undefined symbol" in str(err):
            # A build with the tch provider links the libtorch it was built against; another torch
            # lacks its C++ symbols. The torch-agnostic build has no such tie.
            raise ImportError(
                f"{err}. This hlora was built with the tch provider for another torch than {torch.__version__}; "
                "reinstall it with `pip install ./hlora` (build isolation gives the view provider, which works "
                "with any torch)") from err
        raise
    return _native


def choose_provider(native: ModuleType) -> str:
    """The provider for this process: HLORA_PROVIDER, else tch where it was built for this torch."""
    compiled, _ = native.providers()
    wanted = os.environ.get("HLORA_PROVIDER", "").strip().lower()
    if wanted not in ("", *PROVIDERS):
        raise ImportError(f"HLORA_PROVIDER must be 'tch' or 'view' (or unset), got {wanted!r}")
    built_for = native.torch_version()
    if wanted == "tch":
        if "tch" not in compiled:
            raise ImportError("HLORA_PROVIDER=tch, but this hlora was built without the tch provider (it needs "
                              "torch 2.11.0 at build time: `pip install --no-build-isolation ./hlora` there)")
        if built_for != _installed_torch():
            raise ImportError(f"HLORA_PROVIDER=tch, but the tch provider was built for torch {built_for} and "
                              f"torch {torch.__version__} is installed")
    provider = wanted or ("tch" if "tch" in compiled and built_for == _installed_torch() else "view")
    native.set_provider(provider)
    return provider


def choose_backend() -> Tuple[Optional[ModuleType], str]:
    wanted = os.environ.get("HLORA_BACKEND", "").strip().lower() or "auto"
    if wanted not in ("auto", "rust", "torch"):
        raise ImportError(f"HLORA_BACKEND must be 'rust' or 'torch' (or unset), got {wanted!r}")
    if wanted == "torch":
        return None, "torch"
    try:
        native = _load_native()
        choose_provider(native)
        return native, "rust"
    except ImportError as err:
        if wanted == "rust":
            raise ImportError(f"HLORA_BACKEND=rust, but the native kernels cannot be loaded: {err}") from err
        warnings.warn(
            f"hlora: native kernels unavailable ({err}); using the plain-PyTorch backend",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, "torch"


NATIVE, BACKEND = choose_backend()

#: Per (provider, CUDA device): None when CUDA tensors there run natively, else why not.
_cuda_unavailable: Dict[Tuple[str, int], Optional[str]] = {}


def provider() -> Optional[str]:
    """The provider in use ("tch" or "view"), or None on the plain-PyTorch backend."""
    return None if NATIVE is None else NATIVE.providers()[1]


def set_provider(name: str) -> None:
    """Switches the provider of every later call ("tch" or "view"; for tests and benchmarks)."""
    if NATIVE is None:
        raise RuntimeError("the plain-PyTorch backend has no providers")
    if name == "tch" and NATIVE.torch_version() not in (None, _installed_torch()):
        raise ValueError(f"the tch provider was built for torch {NATIVE.torch_version()}, "
                         f"torch {torch.__version__} is installed")
    NATIVE.set_provider(name)


def runs_on_reference(x: Any) -> bool:
    """Whether a call whose tensors are on ``x``'s device goes to the plain-PyTorch ops although
    the backend is native: CUDA tensors where the fused CUDA kernels cannot load and the provider
    has no CUDA path of its own (the view provider). Said once per device, as a warning."""
    if NATIVE is None:
        return True
    if not (isinstance(x, torch.Tensor) and x.is_cuda):
        return False
    key = (NATIVE.providers()[1], x.get_device())
    if key not in _cuda_unavailable:
        reason = NATIVE.cuda_unavailable(key[1])
        _cuda_unavailable[key] = reason
        if reason is not None:
            warnings.warn(f"hlora: fused CUDA kernels unavailable on cuda:{key[1]} ({reason}); the {key[0]} "
                          "provider runs CUDA tensors through the plain-PyTorch ops", RuntimeWarning, stacklevel=3)
    return _cuda_unavailable[key] is not None
