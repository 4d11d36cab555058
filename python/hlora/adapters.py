"""Finding the LoRA-adapted matrices of a PEFT model.

Each adapted weight (every q_proj, every v_proj, … separately) is one "layer" l of the paper:
``W = W0 + s·B·A`` with ``A = module.lora_A[adapter].weight`` (r, in), ``B =
module.lora_B[adapter].weight`` (out, r) and ``s = module.scaling[adapter]``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from hlora._sharding import RowBlock, row_block


@dataclass(frozen=True)
class AdaptedMatrix:
    """One LoRA-adapted weight: its module name (as ``model.named_modules()`` gives it), its
    factors (the live parameters) and PEFT's scaling. Under FSDP2 the factors are DTensors and
    ``rows`` is the block of the weight's rows this rank holds (B's local rows)."""

    name: str
    a: torch.nn.Parameter
    b: torch.nn.Parameter
    scaling: float
    rows: Optional[RowBlock] = None

    @property
    def shape(self) -> tuple:
        """The whole weight's (out, in)."""
        return (self.b.shape[0], self.a.shape[1])

    @property
    def local_shape(self) -> tuple:
        """The (rows, in) of ω and Ω this rank holds: the whole shape unless sharded."""
        return self.shape if self.rows is None else (self.rows.count, self.a.shape[1])


def unwrap(model: Any) -> Any:
    """The model inside its wrappers — DDP / accelerate (``.module``), ``torch.compile``
    (``._orig_mod``) — so module names, and the importance files keyed by them, are the same
    whether or not the model was wrapped."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def find_adapted(model: torch.nn.Module, adapter: str = "default") -> List[AdaptedMatrix]:
    """Every LoRA-adapted linear layer of ``model`` for ``adapter``, in module order.

    Plain LoRA only: a variant whose weight change is not s·B·A (DoRA, and PEFT's other
    ``lora_variant``s) is refused, and embedding adapters — which no penalty would cover — are
    named in a warning."""
    _refuse_fsdp1(model)
    found, embeddings = [], []
    for name, module in unwrap(model).named_modules():
        if adapter in (getattr(module, "lora_embedding_A", None) or {}):
            embeddings.append(name)
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or adapter not in lora_a:
            continue
        variant = (getattr(module, "lora_variant", None) or {}).get(adapter)
        if variant is not None or (getattr(module, "use_dora", None) or {}).get(adapter):
            kind = type(variant).__name__ if variant is not None else "DoRA"
            raise ValueError(f"{name}: adapter {adapter!r} is a LoRA variant ({kind}) whose weight change is not "
                             "s·B·A; hlora's importance and penalty are defined for plain LoRA only")
        a, b = lora_a[adapter].weight, lora_b[adapter].weight
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"{name}: hlora supports LoRA on linear layers only (got A {tuple(a.shape)})")
        found.append(AdaptedMatrix(name, a, b, float(module.scaling[adapter]), row_block(b, f"{name}.lora_B")))
    if embeddings:
        warnings.warn(f"hlora covers LoRA on linear layers only; the embedding adapters of {embeddings} are "
                      "trained without importance or penalty", stacklevel=2)
    if not found:
        adapters = sorted({k for m in unwrap(model).modules()
                           for k in getattr(getattr(m, "lora_A", None), "keys", lambda: [])()})
        hint = f"; adapters present: {adapters}" if adapters else "; is this a PEFT LoRA model?"
        raise ValueError(f"model has no LoRA-adapted matrices for adapter {adapter!r}{hint}")
    return found


def _refuse_fsdp1(model: torch.nn.Module) -> None:
    """FSDP1 flattens parameters into one buffer per wrapped module and shards that, cutting the
    factors' rows apart; FSDP2 (``fully_shard``) keeps whole rows, which hlora follows."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError("model is wrapped in FSDP1 (FullyShardedDataParallel), which flattens the LoRA factors and "
                         "cuts their rows apart; hlora supports FSDP2: torch.distributed.fsdp.fully_shard, or "
                         "Trainer with TrainingArguments(fsdp=True, fsdp_config={\"version\": 2})")


def adapter_config(model: torch.nn.Module, adapter: str = "default") -> Dict[str, Any]:
    """r, alpha, rsLoRA and target modules of a PEFT adapter (empty when unknown)."""
    cfg = getattr(unwrap(model), "peft_config", {}).get(adapter)
    if cfg is None:
        return {}
    targets = getattr(cfg, "target_modules", None)
    return {"r": getattr(cfg, "r", None), "lora_alpha": getattr(cfg, "lora_alpha", None),
            "use_rslora": bool(getattr(cfg, "use_rslora", False)),
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets}


def model_fingerprint(model: torch.nn.Module) -> Optional[str]:
    """A short hash of the base model's architecture (not its weights): enough to catch an
    importance file recorded on another model."""
    import hashlib
    import json

    base = unwrap(model)
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    config = getattr(base, "config", None)
    if config is None:
        return None
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "n_embd", "n_layer", "n_head")
    summary = {k: getattr(config, k) for k in keys if hasattr(config, k)}
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:16]


def select(matrices: Sequence[AdaptedMatrix], names: Sequence[str]) -> List[AdaptedMatrix]:
    by_name = {m.name: m for m in matrices}
    return [by_name[n] for n in names]
