"""hlora — hierarchical layer-wise and element-wise importance regularization for LoRA.

Song et al. (2025), "How to Alleviate Catastrophic Forgetting in LLMs Finetuning?". Record
element-wise importance while LoRA-training on general text, then fine-tune on a domain with a
penalty that keeps important weights near their general values.
"""

from __future__ import annotations

# torch first: the native module links against torch's shared libraries and has no RPATH.
import torch  # noqa: F401

from hlora import ops, reference
from hlora._loader import BACKEND as _BACKEND
from hlora.importance import Importance
from hlora.recorder import ImportanceRecorder
from hlora.regularizer import Regularizer

__version__ = "0.1.0"

__all__ = ["backend", "ops", "reference", "Importance", "ImportanceRecorder", "Regularizer", "hf", "__version__"]


def backend() -> str:
    """``"rust"`` when the native kernels are in use, ``"torch"`` for the plain-PyTorch path."""
    return _BACKEND


def __getattr__(name: str):
    # hlora.hf needs transformers: imported on first use only.
    if name == "hf":
        import importlib

        return importlib.import_module("hlora.hf")
    raise AttributeError(f"module 'hlora' has no attribute {name!r}")
