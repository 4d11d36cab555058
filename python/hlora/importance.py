"""Element-wise importance Ω of every adapted matrix, with the reference factors the penalty
pulls toward, and its safetensors file format."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

import torch

from hlora import _io, _sharding
from hlora.adapters import find_adapted, model_fingerprint

FORMAT = "hlora-importance"
FORMAT_VERSION = 1
#: One rank's rows of a sharded importance; the index file (FORMAT) names them.
SHARD_FORMAT = "hlora-importance-shard"


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


def read_header(path: str) -> Dict[str, str]:
    """The metadata of an importance file, checked to be one (no tensor read): for failing early."""
    return _io.read_metadata(path, FORMAT)


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
    #: Under FSDP2: each matrix's rows held here, (start, stop, rows of the whole matrix). Ω and
    #: B_ref are those rows; A_ref is whole. Empty when every matrix is whole.
    rows: Dict[str, Tuple[int, int, int]] = field(default_factory=dict)
    #: The process group the rows are spread over (not saved; None when whole).
    group: Any = field(default=None, repr=False, compare=False)

    @property
    def is_sharded(self) -> bool:
        return bool(self.rows)

    @property
    def names(self) -> List[str]:
        return list(self.matrices)

    def norms(self) -> Dict[str, float]:
        """‖Ω_l‖_F per matrix (the input of the layer coefficients, Eq. 15). For a sharded
        importance the squares are summed over the ranks: every rank must call it."""
        squares = torch.tensor([float(torch.linalg.vector_norm(om.double()) ** 2) for om in self.matrices.values()],
                               dtype=torch.float64)
        if self.is_sharded:
            squares = _sharding.all_sum(squares, self.group)
        return {name: float(s.sqrt()) for name, s in zip(self.matrices, squares)}

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
        if self.rows != other.rows:
            raise ValueError("cannot merge importance sharded over other rows")
        return Importance(summed, dict(other.references or self.references), dict(other.scalings or self.scalings),
                          meta, dict(self.rows), self.group)

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

    def _header(self) -> Dict[str, str]:
        from hlora import __version__

        return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "hlora_version": __version__,
                "names": json.dumps(self.names), "scalings": json.dumps(self.scalings),
                "meta": json.dumps(self.meta, default=str)}

    def _omegas(self, dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
        return {f"omega/{name}": cast_omega(om, dtype, name) if dtype is not None else om
                for name, om in self.matrices.items()}

    def save(self, path: str, *, dtype: Optional[torch.dtype] = None) -> None:
        """Writes a safetensors file atomically. ``dtype=torch.bfloat16`` halves Ω's bytes.

        A sharded importance (FSDP2) is saved by every rank together: each writes its rows to a
        file of its own beside ``path`` (``<path>.shard-<id>-00001-of-00004``), then rank 0 writes
        ``path`` itself, naming them — so ``path`` names a whole set or the previous one, never half
        of one. Any world size loads it (:meth:`load`)."""
        check_save_dtype(dtype, "dtype")
        if self.is_sharded:
            self._save_shards(os.fspath(path), dtype)
            return
        tensors = self._omegas(dtype)
        for name, (a, b) in self.references.items():
            tensors[f"a_ref/{name}"] = a
            tensors[f"b_ref/{name}"] = b
        _io.save_atomic(path, tensors, self._header())

    def _save_shards(self, path: str, dtype: Optional[torch.dtype]) -> None:
        rank, world = _sharding.rank_and_world(self.group)
        folder, base = os.path.split(os.path.abspath(path))
        token = _sharding.gather_objects(uuid.uuid4().hex[:12] if rank == 0 else None, self.group)[0]
        shard = f"{base}.shard-{token}-{rank:05d}-of-{world:05d}"
        tensors = self._omegas(dtype)
        tensors.update({f"b_ref/{name}": b for name, (_, b) in self.references.items()})
        _io.save_atomic(os.path.join(folder, shard), tensors,
                        {"format": SHARD_FORMAT, "rows": json.dumps(self.rows), "names": json.dumps(self.names)})
        shards = _sharding.gather_objects(shard, self.group)  # every rank's file is written
        if rank == 0:
            whole = {name: rows for name, (_, _, rows) in self.rows.items()}
            _io.save_atomic(path, {f"a_ref/{name}": a for name, (a, _) in self.references.items()},
                            {**self._header(), "shards": json.dumps(shards), "rows": json.dumps(whole)})
            for name in os.listdir(folder):  # earlier sets, no longer named by the index
                if name.startswith(f"{base}.shard-") and name not in shards:
                    os.remove(os.path.join(folder, name))
        _sharding.barrier(self.group)

    @classmethod
    def load(cls, path: str, *, device: Optional[torch.device] = None,
             shard_for: Optional[torch.nn.Module] = None, adapter: str = "default") -> Importance:
        """Reads a file written by :meth:`save`, whole or sharded. With ``shard_for`` (a model FSDP2
        sharded), each rank gets only the rows it holds — from a sharded set only the
        files holding them are read, whatever world size wrote them; without, the whole Ω."""
        path = os.fspath(path)
        tensors, meta = _io.load_checked(path, FORMAT)
        version = meta.get("format_version")
        if version != str(FORMAT_VERSION):
            raise ValueError(f"{path} has importance format version {version}; this hlora reads version "
                             f"{FORMAT_VERSION}")
        names = json.loads(meta["names"])
        scalings = {k: float(v) for k, v in json.loads(meta["scalings"]).items()}
        info = json.loads(meta["meta"])
        if "shards" not in meta:
            matrices = {n: tensors[f"omega/{n}"] for n in names}
            references = {n: (tensors[f"a_ref/{n}"], tensors[f"b_ref/{n}"]) for n in names if f"a_ref/{n}" in tensors}
            imp = cls(matrices, references, scalings, info)
            if shard_for is not None:
                imp = imp.shard_for(shard_for, adapter)
        else:
            imp = cls._from_shards(path, meta, tensors, names, scalings, info, shard_for, adapter)
        return imp.to(device) if device is not None else imp

    @classmethod
    def _from_shards(cls, path: str, meta: Dict[str, str], index: Dict[str, torch.Tensor], names: List[str],
                     scalings: Dict[str, float], info: Dict[str, Any], shard_for: Optional[torch.nn.Module],
                     adapter: str) -> Importance:
        from safetensors import safe_open

        folder = os.path.dirname(os.path.abspath(path))
        whole = {n: int(r) for n, r in json.loads(meta["rows"]).items()}
        wanted, group = _target_rows(names, whole, shard_for, adapter)
        pieces: Dict[str, List[Tuple[int, torch.Tensor, Optional[torch.Tensor]]]] = {n: [] for n in names}
        for number, shard in enumerate(json.loads(meta["shards"])):
            file = os.path.join(folder, shard)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path} names {shard}, which is not in {folder}")
            with safe_open(file, framework="pt") as f:  # the rows first (no tensor read)
                held = {n: tuple(r) for n, r in json.loads((f.metadata() or {}).get("rows", "{}")).items()}
            # (The first shard is read in any case: a rank holding no rows still needs Ω's dtype and width.)
            if number and not any(n in held and held[n][0] < wanted[n][1] and wanted[n][0] < held[n][1]
                                  for n in names):
                continue
            tensors, _ = _io.load_checked(file, SHARD_FORMAT)
            for n in names:
                if n in held:
                    pieces[n].append((held[n][0], tensors[f"omega/{n}"], tensors.get(f"b_ref/{n}")))
        matrices, references, rows = {}, {}, {}
        for n in names:
            start, stop = wanted[n]
            om = _rows_of(sorted(pieces[n], key=lambda p: p[0]), start, stop, 1, n, path)
            matrices[n] = om
            if f"a_ref/{n}" in index:
                references[n] = (index[f"a_ref/{n}"], _rows_of(sorted(pieces[n], key=lambda p: p[0]), start, stop, 2,
                                                                n, path))
            if shard_for is not None and group is not None:
                rows[n] = (start, stop, whole[n])
        return cls(matrices, references, scalings, info, rows, group)

    def shard_for(self, model: torch.nn.Module, adapter: str = "default") -> Importance:
        """This whole importance cut to the rows ``model``'s rank holds under FSDP2 (itself when the
        model is not sharded)."""
        if self.is_sharded:
            raise ValueError("this importance is already sharded; load its file with shard_for=model to reshard it")
        whole = {n: om.shape[0] for n, om in self.matrices.items()}
        wanted, group = _target_rows(self.names, whole, model, adapter)
        if group is None:
            return self
        matrices = {n: om[wanted[n][0]:wanted[n][1]].clone() for n, om in self.matrices.items()}
        references = {n: (a, b[wanted[n][0]:wanted[n][1]].clone()) for n, (a, b) in self.references.items()}
        rows = {n: (wanted[n][0], wanted[n][1], whole[n]) for n in self.names}
        return Importance(matrices, references, dict(self.scalings), dict(self.meta), rows, group)

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
            m, om = adapted[name], self.matrices[name]
            held = self.rows.get(name)
            got = (held[2], om.shape[1]) if held else tuple(om.shape)
            if m.shape != got:
                problems.append(f"mis-shaped: {name} has importance {got} but the model's weight is {m.shape}")
                continue
            here = (m.rows.start, m.rows.stop) if m.rows is not None else (0, m.shape[0])
            mine = tuple(held[:2]) if held else (0, om.shape[0])
            if mine != here:
                problems.append(f"sharded: {name} holds rows {mine[0]}:{mine[1]} here but the model's rank holds "
                                f"{here[0]}:{here[1]} (Importance.load(path, shard_for=model))")
            if references and name in self.references:
                a_ref, b_ref = self.references[name]
                rank = a_ref.shape[0]
                if a_ref.shape != (rank, m.shape[1]) or b_ref.shape != (om.shape[0], rank):
                    problems.append(f"mis-shaped: {name} reference factors {tuple(b_ref.shape)}·{tuple(a_ref.shape)} "
                                    f"do not factor its weight {m.shape} as (out, r)·(r, in)")
        fingerprint = self.meta.get("base_model_fingerprint")
        if fingerprint and fingerprint != model_fingerprint(model):
            problems.append("base model: the importance was recorded on a model of another architecture")
        if problems:
            raise ValueError("importance does not match the model:\n  " + "\n  ".join(problems))


def _target_rows(names: List[str], whole: Dict[str, int], model: Optional[torch.nn.Module],
                 adapter: str) -> Tuple[Dict[str, Tuple[int, int]], Any]:
    """The rows of each matrix to hold: those ``model``'s rank holds under FSDP2, else all; with
    the process group they are spread over (None when whole)."""
    if model is None:
        return {n: (0, whole[n]) for n in names}, None
    adapted = {m.name: m for m in find_adapted(model, adapter)}
    group = _sharding.group_of([m.rows for m in adapted.values()])
    wanted = {}
    for n in names:
        m = adapted.get(n)
        if m is None or m.rows is None:
            wanted[n] = (0, whole[n])
        else:
            if m.rows.rows != whole[n]:
                raise ValueError(f"{n}: the importance has {whole[n]} rows, the model's weight {m.rows.rows}")
            wanted[n] = (m.rows.start, m.rows.stop)
    return wanted, group


def _rows_of(pieces: List[Tuple[int, torch.Tensor, Optional[torch.Tensor]]], start: int, stop: int, which: int,
             name: str, path: str) -> torch.Tensor:
    """Rows start:stop of a matrix from the shards' pieces (start row, Ω rows, B_ref rows)."""
    parts = []
    for first, *tensors in pieces:
        t = tensors[which - 1]
        if t is None:
            continue
        lo, hi = max(start, first), min(stop, first + t.shape[0])
        if lo < hi:
            parts.append(t[lo - first:hi - first])
    if not parts:
        like = next((p[which] for p in pieces if p[which] is not None), None)
        if like is None:
            raise ValueError(f"{path}: no shard holds {name}")
        return like[:0].clone()
    out = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
    if out.shape[0] != stop - start:
        raise ValueError(f"{path}: the shards hold {out.shape[0]} of rows {start}:{stop} of {name} (a shard missing?)")
    return out
