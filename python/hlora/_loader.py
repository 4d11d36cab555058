"""Chooses the backend once, at import: the native Rust kernels, or plain PyTorch.

``HLORA_BACKEND=rust`` insists on the native module (ImportError with the reason if it cannot
load), ``HLORA_BACKEND=torch`` forces the reference, and anything else tries native first and
warns once when it falls back.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Optional, Tuple

import torch

#: The torch the native module is linked against (tch 0.24 ↔ libtorch 2.11.0).
REQUIRED_TORCH = "2.11.0"


def _installed_torch() -> str:
    return torch.__version__.split("+")[0]


def _load_native() -> ModuleType:
    if _installed_torch() != REQUIRED_TORCH:
        raise ImportError(
            f"hlora's native kernels are built for torch {REQUIRED_TORCH}, but torch {torch.__version__} "
            f"is installed; install torch=={REQUIRED_TORCH} or set HLORA_BACKEND=torch"
        )
    from hlora import _native  # noqa: PLC0415 — must follow `import torch` (no RPATH)

    if _native.torch_version() != _installed_torch():
        raise ImportError(
            f"hlora._native was built for torch {_native.torch_version()}, found {torch.__version__}"
        )
    return _native


def choose_backend() -> Tuple[Optional[ModuleType], str]:
    wanted = os.environ.get("HLORA_BACKEND", "").strip().lower() or "auto"
    if wanted not in ("auto", "rust", "torch"):
        raise ImportError(f"HLORA_BACKEND must be 'rust' or 'torch' (or unset), got {wanted!r}")
    if wanted == "torch":
        return None, "torch"
    try:
        return _load_native(), "rust"
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
