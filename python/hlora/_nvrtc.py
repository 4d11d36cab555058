"""Makes NVRTC loadable for the fused CUDA kernels.

The CUDA build of torch ships NVRTC in ``site-packages/nvidia/cu13/lib``, which is not on the
loader path. Loading ``libnvrtc-builtins`` and ``libnvrtc`` here, globally, lets the native
module's ``dlopen("libnvrtc.so.13")`` find the already-loaded library by its soname (and NVRTC
find its builtins). Nothing happens when they are absent: the native side then reports NVRTC
as missing and falls back to the tch path.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import List, Optional

_LIBS = ("libnvrtc-builtins.so.13.0", "libnvrtc.so.13")
_loaded: Optional[List[str]] = None


def nvrtc_dirs() -> List[Path]:
    """Folders that may hold NVRTC: ``HLORA_NVRTC_DIR``, then the ``nvidia`` wheels torch uses."""
    dirs: List[Path] = []
    if os.environ.get("HLORA_NVRTC_DIR"):
        dirs.append(Path(os.environ["HLORA_NVRTC_DIR"]))
    try:
        import nvidia  # namespace package installed with CUDA builds of torch
    except ImportError:
        return dirs
    for root in getattr(nvidia, "__path__", []):
        for sub in ("cu13/lib", "cuda_nvrtc/lib"):
            if (Path(root) / sub).is_dir():
                dirs.append(Path(root) / sub)
    return dirs


def preload() -> List[str]:
    """Loads NVRTC (once per process) and returns the paths loaded (empty when not found)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    _loaded = []
    for folder in nvrtc_dirs():
        paths = [folder / name for name in _LIBS]
        if all(p.exists() for p in paths):
            for p in paths:
                ctypes.CDLL(str(p), mode=ctypes.RTLD_GLOBAL)
                _loaded.append(str(p))
            break
    return _loaded
