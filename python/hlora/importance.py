"""Element-wise importance Ω of every adapted matrix, with the reference factors the penalty
pulls toward, and its safetensors file format."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

import torch

from hlora import _io
from hlora.adapters import find_adapted, model_fingerprint

FORMAT = "hlora-importance"
FORMAT_VERSION = 1


def cast_omega(omega: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Ω stored as ``dtype``, refusing a cast that would turn finite entries into inf: float16
    ends at 65504, while Ω = ω/(Δ² + ξ) reaches ~1e9 with a small ξ."""
    return _refuse_overflow(omega, omega.to(dtype), name)


def _refuse_overflow(omega: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
    """``out`` (Ω cast), unless the cast turned finite entries into inf."""
    dtype = out.dtype
    if dtype != omega.dtype and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(omega).all()):
        raise ValueError(f"{name}: Ω reaches {float(omega.abs().max()):.3g}, beyond the range of "
                         f"{str(dtype).replace('torch.', '')} ({torch.finfo(dtype).max:.3g}); "
                         "use bfloat16 or float32")
    return out


#: What ``Importance.save(dtype=...)`` can store Ω as.
SAVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_save_dtype(dtype: Optional[torch.dtype], name: str) -> None:
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise TypeError(f"{name} must be a floating dtype for Ω (float32, float64, bfloat16 or float16), got {dtype}")


@dataclass
class Importance:
    """Ω per adapted matrix, keyed by module name as ``model.named_modules()`` gives it.

    ``references`` holds the factors (A_ref, B_ref) at the end of the general task and
    ``scalings`` their PEFT scaling s_ref; ``meta`` records how Ω was made (ξ, clamp policy, steps
    recorded and skipped, adapter r/alpha/rsLoRA, base-model fingerprint).
    """

    matrices: Dict[str, torch.Tensor]
    references: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scalings: Dict[str, float] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> List[str]:
        return list(self.matrices)

    def norms(self) -> Dict[str, float]:
        """‖Ω_l‖_F per matrix (the input of the layer coefficients, Eq. 15)."""
        return {name: float(torch.linalg.vector_norm(om.float())) for name, om in self.matrices.items()}

    def merge(self, other: Importance) -> Importance:
        """Σ over general tasks (Eq. 13): Ω adds up; the references are the later task's."""
        if not isinstance(other, Importance):
            raise TypeError(f"other must be an hlora.Importance, got {type(other).__name__}")
        if set(self.matrices) != set(other.matrices):
            missing = sorted(set(self.matrices) ^ set(other.matrices))
            raise ValueError(f"cannot merge importance over different matrices: {missing}")
        summed = {}
        for name, om in self.matrices.items():
            if om.shape != other.matrices[name].shape:
                raise ValueError(f"{name}: shapes differ ({tuple(om.shape)} vs {tuple(other.matrices[name].shape)})")
            summed[name] = om + other.matrices[name].to(om.device, om.dtype)
        meta = {**self.meta, **other.meta}
        for key in ("steps", "skipped_steps"):
            meta[key] = int(self.meta.get(key, 0)) + int(other.meta.get(key, 0))
        meta["tasks"] = int(self.meta.get("tasks", 1)) + int(other.meta.get("tasks", 1))
        return Importance(summed, dict(other.references or self.references), dict(other.scalings or self.scalings),
                          meta)

    def to(self, *args: Any, **kwargs: Any) -> Importance:
        """Ω moved/cast like ``Tensor.to`` — cast only to a dtype Ω can be kept in (float32,
        float64, bfloat16, float16) and not past its range; reference factors moved to the same
        device only."""
        for arg in [*args, kwargs.get("device")]:
            if isinstance(arg, str):  # torch's own parse error is a RuntimeError
                try:
                    torch.device(arg)
                except RuntimeError as err:
                    raise ValueError(f"device: {err}") from None
        matrices = {}
        for name, om in self.matrices.items():
            moved = om.to(*args, **kwargs)
            if moved.dtype != om.dtype:  # an integer Ω would hold zeros for the small entries
                check_save_dtype(moved.dtype, "dtype")
            matrices[name] = _refuse_overflow(om, moved, name)
        device = next(iter(matrices.values())).device if matrices else None
        refs = {k: (a.to(device), b.to(device)) for k, (a, b) in self.references.items()}
        return replace(self, matrices=matrices, references=refs)

    # ---- files ----

    def save(self, path: str, *, dtype: Optional[torch.dtype] = None) -> None:
        """Writes a safetensors file atomically. ``dtype=torch.bfloat16`` halves Ω's bytes."""
        check_save_dtype(dtype, "dtype")
        tensors: Dict[str, torch.Tensor] = {}
        for name, om in self.matrices.items():
            tensors[f"omega/{name}"] = cast_omega(om, dtype, name) if dtype is not None else om
        for name, (a, b) in self.references.items():
            tensors[f"a_ref/{name}"] = a
            tensors[f"b_ref/{name}"] = b
        from hlora import __version__

        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "hlora_version": __version__,
                "names": json.dumps(self.names), "scalings": json.dumps(self.scalings),
                "meta": json.dumps(self.meta, default=str)}
        _io.save_atomic(path, tensors, meta)

    @classmethod
    def load(cls, path: str, *, device: Optional[torch.device] = None) -> Importance:
        tensors, meta = _io.load_checked(os.fspath(path), FORMAT)
        version = meta.get("format_version")
        if version != str(FORMAT_VERSION):
            raise ValueError(f"{path} has importance format version {version}; this hlora reads version "
                             f"{FORMAT_VERSION}")
        names = json.loads(meta["names"])
        matrices = {n: tensors[f"omega/{n}"] for n in names}
        references = {n: (tensors[f"a_ref/{n}"], tensors[f"b_ref/{n}"]) for n in names if f"a_ref/{n}" in tensors}
        imp = cls(matrices, references, {k: float(v) for k, v in json.loads(meta["scalings"]).items()},
                  json.loads(meta["meta"]))
        return imp.to(device) if device is not None else imp

    # ---- checks ----

    def check(self, model: torch.nn.Module, adapter: str = "default", references: bool = True) -> None:
        """Raises ValueError naming every missing, extra or mis-shaped matrix (and a different
        base model) between this importance and ``model``'s adapter; with ``references``, also
        reference factors that do not factor the adapted weight's shape (another rank than the
        adapter's is fine: the Regularizer pads the smaller one with zeros)."""
        adapted = {m.name: m for m in find_adapted(model, adapter)}
        problems = []
        for name in sorted(set(self.matrices) - set(adapted)):
            problems.append(f"extra: {name} has importance but is not adapted in the model")
        for name in sorted(set(adapted) - set(self.matrices)):
            problems.append(f"missing: {name} is adapted in the model but has no importance")
        for name in sorted(set(adapted) & set(self.matrices)):
            want, got = adapted[name].shape, tuple(self.matrices[name].shape)
            if want != got:
                problems.append(f"mis-shaped: {name} has importance {got} but the model's weight is {want}")
            if references and name in self.references:
                a_ref, b_ref = self.references[name]
                (out, inn), rank = want, a_ref.shape[0]
                if a_ref.shape != (rank, inn) or b_ref.shape != (out, rank):
                    problems.append(f"mis-shaped: {name} reference factors {tuple(b_ref.shape)}·{tuple(a_ref.shape)} "
                                    f"do not factor its weight {want} as (out, r)·(r, in)")
        fingerprint = self.meta.get("base_model_fingerprint")
        if fingerprint and fingerprint != model_fingerprint(model):
            problems.append("base model: the importance was recorded on a model of another architecture")
        if problems:
            raise ValueError("importance does not match the model:\n  " + "\n  ".join(problems))
