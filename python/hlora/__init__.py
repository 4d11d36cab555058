"""hlora — hierarchical layer-wise and element-wise importance regularization for LoRA.

Song et al. (2025), "How to Alleviate Catastrophic Forgetting in LLMs Finetuning?". Record
element-wise importance while LoRA-training on general text, then fine-tune on a domain with a
penalty that keeps important weights near their general values.
"""

from __future__ import annotations

# torch first: the native module links against torch's shared libraries and has no RPATH.
import torch  # noqa: F401

from hlora import _loader, ops, reference
from hlora._loader import BACKEND as _BACKEND
from hlora.importance import Importance
from hlora.recorder import ImportanceRecorder
from hlora.regularizer import Regularizer

__version__ = "0.1.0"

__all__ = ["backend", "backend_info", "ops", "reference", "Importance", "ImportanceRecorder", "Regularizer", "hf",
           "__version__"]


def backend() -> str:
    """``"rust"`` when the native kernels are in use, ``"torch"`` for the plain-PyTorch path."""
    return _BACKEND


def backend_info() -> dict:
    """What runs the ops in this process: the backend; for the native one the provider in use
    and those built in, the torch the tch provider was built against (None without it), the CPU
    kernels' instruction set and threads, and whether CUDA tensors get the fused kernels (asked
    only when a GPU is present: the first ask compiles them, ~15 s, then cached on disk)."""
    native = _loader.NATIVE
    info = {"backend": _BACKEND, "torch": torch.__version__, "provider": None, "providers": [],
            "built_for_torch": None, "simd": None, "cpu_threading": None, "cuda": None}
    if native is None:
        return info
    compiled, active = native.providers()
    info.update(provider=active, providers=list(compiled), built_for_torch=native.torch_version(),
                simd=native.simd_level(), cpu_threading=native.cpu_threading())
    if torch.cuda.is_available():
        reason = native.cuda_unavailable(torch.cuda.current_device())
        info["cuda"] = native.cuda_status(torch.cuda.current_device()) if reason is None or active == "tch" \
            else f"plain-PyTorch ops ({reason})"
    return info


def __getattr__(name: str):
    # hlora.hf needs transformers: imported on first use only.
    if name == "hf":
        import importlib

        return importlib.import_module("hlora.hf")
    raise AttributeError(f"module 'hlora' has no attribute {name!r}")
