"""Recording element-wise importance during LoRA training on general data (Eq. 7–13).

Under FSDP2 (``fully_shard``) every rank records the rows of each matrix it holds: ω, Ω and the
reference B are that row block, A is gathered whole (it is r × in). Every rank calls the same
methods at the same steps (they gather and all-reduce).

Use it in any training loop::

    recorder = hlora.ImportanceRecorder(model, optimizer, xi=1e-3)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        recorder.before_step()      # after backward (and clipping), before optimizer.step()
        optimizer.step()
        recorder.after_step()
        optimizer.zero_grad()
    importance = recorder.finalize()
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from hlora import _checks as check
from hlora import _io, _sharding, ops
from hlora.adapters import AdaptedMatrix, adapter_config, find_adapted, model_fingerprint
from hlora.importance import Importance

#: ξ of Eq. 13. 1e-3 is the pilot calibration in DATA.md (SmolLM2, r=8, α=32, AdamW lr 8e-4):
#: Δ² of a typical entry is far below it, so ξ sets Ω's scale — and φ is chosen with it.
DEFAULT_XI = 1e-3
CLAMP_POLICIES = ("final", "step", "none")
STATE_FORMAT = "hlora-recorder-state"


def check_recorder_options(xi: object, clamp: object) -> float:
    """ξ as a float, after checking it and the clamp policy (also what the HF callback checks
    when it is made, before a Trainer runs)."""
    if clamp not in CLAMP_POLICIES:
        raise ValueError(f"clamp must be one of {CLAMP_POLICIES}, got {clamp!r}")
    return check.positive(xi, "xi")


class _Copies:
    """Copies of a model's LoRA factors (or their gradients) in buffers kept from step to step,
    one flat tensor per device and dtype, refreshed with one multi-tensor copy per group: a
    model has ~100 small factors, and on a GPU a copy each costs a launch — microseconds of CPU
    time per factor, per step, while the GPU waits. (Reusing the buffers is safe: the ω update
    that read the last step's copies was queued on the stream before the next copy.)"""

    def __init__(self) -> None:
        self._signature: List[Tuple[torch.device, torch.dtype, torch.Size]] = []
        self.flats: List[torch.Tensor] = []
        #: Which of the alternating tensors (0: the 1st, 3rd, … — A; 1: the others — B) each flat holds.
        self.parts: List[int] = []
        self.views: List[torch.Tensor] = []
        self._groups: List[Tuple[List[int], List[torch.Tensor]]] = []

    def _allocate(self, tensors: Sequence[torch.Tensor]) -> None:
        by_kind: Dict[Tuple[torch.device, torch.dtype, int], List[int]] = {}
        for i, t in enumerate(tensors):
            by_kind.setdefault((t.device, t.dtype, i % 2), []).append(i)
        views: List[Optional[torch.Tensor]] = [None] * len(tensors)
        self.flats, self.parts, self._groups = [], [], []
        for (device, dtype, part), idx in by_kind.items():
            flat = torch.empty(sum(tensors[i].numel() for i in idx), device=device, dtype=dtype)
            for i, view in zip(idx, flat.split([tensors[i].numel() for i in idx])):
                views[i] = view.view(tensors[i].shape)
            self.flats.append(flat)
            self.parts.append(part)
            self._groups.append((idx, [views[i] for i in idx]))  # type: ignore[misc]
        self.views = views  # type: ignore[assignment]

    def take(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Copies `tensors` — pairs such as (A, B) or (gA, gB), kept in separate buffers — into
        the buffers (made anew when shapes, dtypes or devices change) and returns the copies."""
        signature = [(t.device, t.dtype, t.shape) for t in tensors]
        if signature != self._signature:
            self._allocate(tensors)
            self._signature = signature
        with torch.no_grad():
            for idx, dst in self._groups:
                torch._foreach_copy_(dst, [tensors[i] for i in idx])
        return self.views


class ImportanceRecorder:
    """Accumulates ω (Eq. 12) over the optimizer steps of a general task and turns it into
    :class:`~hlora.Importance` (Eq. 13).

    Args:
        model: a PEFT model (or anything whose modules carry ``lora_A``/``lora_B``).
        optimizer: where the learning rate of each step is read (the group holding each
            matrix's LoRA parameters); optional if ``before_step(lr=...)`` is always given.
        adapter: the PEFT adapter name.
        xi: ξ of Eq. 13.
        clamp: ``"final"`` clamps negative Ω to 0 (default), ``"step"`` clamps the running ω
            after every step (the authors' code), ``"none"`` keeps the paper's text.
        matrices: an explicit list of :class:`~hlora.adapters.AdaptedMatrix` instead of the
            model's.
    """

    def __init__(self, model: Optional[torch.nn.Module], optimizer: Optional[torch.optim.Optimizer] = None, *,
                 adapter: str = "default", xi: float = DEFAULT_XI, clamp: str = "final",
                 matrices: Optional[Sequence[AdaptedMatrix]] = None) -> None:
        xi = check_recorder_options(xi, clamp)
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(f"optimizer must be a torch optimizer (with param_groups), got {type(optimizer).__name__}")
        if matrices is None:
            if model is None:
                raise ValueError("give a model or an explicit list of matrices")
            matrices = find_adapted(model, adapter)
        self.matrices: List[AdaptedMatrix] = list(matrices)
        #: The process group FSDP2 shards the factors over (None: every rank has whole factors).
        self.group = _sharding.group_of([m.rows for m in self.matrices])
        self.optimizer = optimizer
        self.xi, self.clamp, self.adapter = xi, clamp, adapter
        self._adapter_config = adapter_config(model, adapter) if model is not None else {}
        self._fingerprint = model_fingerprint(model) if model is not None else None
        self.omega: List[torch.Tensor] = [
            torch.zeros(m.local_shape, device=m.a.device,
                        dtype=torch.float64 if m.a.dtype == torch.float64 else torch.float32)
            for m in self.matrices]
        self._start = self._pairs(clone=True)
        self.steps = 0
        self.skipped = 0
        self._pending: Optional[Tuple] = None
        self._before, self._grads, self._after = _Copies(), _Copies(), _Copies()
        self._warned_split_lr = False

    # ---- per step ----

    def _factors(self, clone: bool = False, grads: bool = False,
                 all_of: Optional[bool] = None) -> Tuple[List[torch.Tensor], Optional[bool]]:
        """A, B (and with ``grads`` gA, gB) of each matrix as the ω update reads them, flat in
        that order per matrix, detached (copies with ``clone``): A and gA whole — under FSDP2
        gathered for every matrix in one collective, which also carries ``all_of`` (see
        :func:`hlora._sharding.gathered_many`) — B and gB the rows held here, zeros where a factor
        has no gradient."""
        count = len(self.matrices)
        wanted = [m.a for m in self.matrices] + ([m.a.grad for m in self.matrices] if grads else [])
        whole, agreed = _sharding.gathered_many(wanted, all_of=all_of)
        out = []
        for i, m in enumerate(self.matrices):
            a, b = whole[i].detach(), _sharding.local_data(m.b)
            out += [a.clone(), b.clone()] if clone else [a, b]
            if grads:
                ga, gb = whole[count + i], _sharding.local_grad(m.b)
                out += [ga.detach() if ga is not None else torch.zeros(m.a.shape, dtype=m.a.dtype, device=m.a.device),
                        gb if gb is not None else torch.zeros(m.local_shape[0], m.b.shape[1], dtype=m.b.dtype,
                                                              device=m.b.device)]
        return out, agreed

    def _pairs(self, clone: bool = False) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(A whole, B's rows held here) of each matrix (see :meth:`_factors`)."""
        flat, _ = self._factors(clone=clone)
        return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(self.matrices))]

    def _learning_rates(self) -> List[float]:
        if self.optimizer is None:
            raise ValueError("before_step() needs lr=... when the recorder has no optimizer")
        group_of = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                group_of[id(p)] = group
        lrs = []
        for m in self.matrices:
            group, group_b = group_of.get(id(m.a)), group_of.get(id(m.b))
            if group is None or group_b is None:
                raise ValueError(f"{m.name}: its LoRA parameters are not in the optimizer")
            lrs.append(float(group["lr"]))
            if float(group_b["lr"]) != lrs[-1] and not self._warned_split_lr:
                # LoRA+ (a larger learning rate for B): Eq. 11 has one η. Its η·gB·gA term is the
                # SGD correction, negligible under AdamW; A's rate is used.
                warnings.warn(f"{m.name}: A and B have different learning rates ({lrs[-1]:g}, "
                              f"{float(group_b['lr']):g}); Eq. 11's η·gB·gA term uses A's", stacklevel=3)
                self._warned_split_lr = True
        return lrs

    def _follow_model(self) -> None:
        """Moves ω and the start factors to where the model now is (a recorder made before
        ``model.to("cuda")``), keeping what was accumulated."""
        if self.omega[0].device == self.matrices[0].a.device:
            return
        self.omega = [om.to(m.a.device) for om, m in zip(self.omega, self.matrices)]
        self._start = [(a0.to(m.a.device), b0.to(m.b.device)) for (a0, b0), m in zip(self._start, self.matrices)]

    def before_step(self, lr: Optional[float] = None) -> None:
        """Snapshots A, B and their gradients as the optimizer will see them (call after
        backward and any clipping/unscaling, right before ``optimizer.step()``)."""
        lrs = [float(lr)] * len(self.matrices) if lr is not None else self._learning_rates()
        self._follow_model()
        taken, _ = self._factors(grads=True)
        factors = self._before.take([t for i in range(len(self.matrices)) for t in taken[4 * i:4 * i + 2]])
        grads = self._grads.take([t for i in range(len(self.matrices)) for t in taken[4 * i + 2:4 * i + 4]])
        snapshot = [(factors[2 * i], factors[2 * i + 1], grads[2 * i], grads[2 * i + 1])
                    for i in range(len(self.matrices))]
        # One check (one wait for a GPU) for all gradients, not one per matrix. Under FSDP2 the
        # ranks agree in after_step (each holds other rows of gB).
        checks = [torch.isfinite(flat).all() for flat in self._grads.flats]
        finite = all(bool(c) for c in checks) if len({c.device for c in checks}) != 1 \
            else bool(torch.stack(checks).all())
        self._pending = (snapshot, lrs, finite)

    def after_step(self, skipped: bool = False) -> bool:
        """Accumulates ω for the step just taken. Returns False (and counts the step as skipped)
        when its gradients were not finite, the optimizer skipped it (``skipped=True``, or no
        parameter changed), so ω never sees a NaN."""
        if self._pending is None:
            raise RuntimeError("after_step() called without before_step() for this step")
        snapshot, lrs, finite = self._pending
        self._pending = None
        # Every rank skips a step any rank saw non-finite gradients in: agreed in the same
        # collective that gathers A.
        taken, finite = self._factors(all_of=finite)
        now = self._after.take(taken)
        same = [torch.equal(x, y) for x, y in zip(self._before.flats, self._after.flats)]
        a_same = all(eq for eq, part in zip(same, self._after.parts) if part == 0)
        b_same = all(eq for eq, part in zip(same, self._after.parts) if part == 1)
        unchanged = a_same and b_same
        if a_same and self.group is not None:
            # A is whole on every rank, so every rank is here: agree on the rows of B each holds.
            unchanged = _sharding.all_true(b_same, self.group, self.omega[0].device)
        if skipped or not finite or unchanged:
            self.skipped += 1
            return False
        by_lr: Dict[float, List[int]] = {}
        for i, lr in enumerate(lrs):
            by_lr.setdefault(lr, []).append(i)
        for lr, idx in by_lr.items():
            ops.accumulate_omega_many_(
                [self.omega[i] for i in idx],
                [snapshot[i][0] for i in idx], [snapshot[i][1] for i in idx],
                [snapshot[i][2] for i in idx], [snapshot[i][3] for i in idx],
                [now[2 * i] for i in idx], [now[2 * i + 1] for i in idx],
                lr=lr, scaling=[self.matrices[i].scaling for i in idx], clamp_negative=self.clamp == "step")
        self.steps += 1
        return True

    # ---- end of the general task ----

    def finalize(self) -> Importance:
        """Ω = ω / (Δ² + ξ) for every matrix (Δ measured from the adapter at the start of this
        task), with the current factors as reference. Resets ω and the start point, so the
        recorder can go on into another general task (merge the results with ``Importance.merge``)."""
        if self.steps == 0:
            warnings.warn(f"no optimizer step was recorded ({self.skipped} skipped): Ω is zero everywhere, "
                          "so a penalty built on it is 0", stacklevel=2)
        self._follow_model()
        matrices, references, scalings = {}, {}, {}
        factors = self._pairs()
        results, _ = ops.finalize_importance_many(
            self.omega, [a for a, _ in factors], [b for _, b in factors],
            [a0 for a0, _ in self._start], [b0 for _, b0 in self._start],
            scaling=[m.scaling for m in self.matrices], xi=self.xi, clamp_negative=self.clamp != "none")
        for m, (a, b), big_omega in zip(self.matrices, factors, results):
            matrices[m.name] = big_omega
            references[m.name] = (a.clone(), b.clone())
            scalings[m.name] = m.scaling
        meta = {"xi": self.xi, "clamp": self.clamp, "steps": self.steps, "skipped_steps": self.skipped,
                "adapter": self.adapter, **{f"adapter_{k}": v for k, v in self._adapter_config.items()},
                "base_model_fingerprint": self._fingerprint, "tasks": 1}
        for om in self.omega:
            om.zero_()
        self._start = self._pairs(clone=True)
        self.steps = self.skipped = 0
        rows = {m.name: (m.rows.start, m.rows.stop, m.rows.rows) for m in self.matrices if m.rows is not None}
        return Importance(matrices, references, scalings, meta, rows=rows, group=self.group)

    # ---- resume ----

    def state_dict(self) -> Dict[str, object]:
        tensors = {}
        for m, om, (a0, b0) in zip(self.matrices, self.omega, self._start):
            tensors[f"omega/{m.name}"] = om
            tensors[f"a_start/{m.name}"] = a0
            tensors[f"b_start/{m.name}"] = b0
        meta = {"names": [m.name for m in self.matrices], "steps": self.steps, "skipped": self.skipped,
                "xi": self.xi, "clamp": self.clamp, "rows": self._rows()}
        return {"tensors": tensors, "meta": meta}

    def _rows(self) -> Dict[str, List[int]]:
        """Each sharded matrix's rows held here: [start, stop, rows] (empty when not sharded)."""
        return {m.name: [m.rows.start, m.rows.stop, m.rows.rows] for m in self.matrices if m.rows is not None}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        meta, tensors = state["meta"], state["tensors"]
        names = [m.name for m in self.matrices]
        if meta["names"] != names:
            raise ValueError("recorder state is for other matrices: "
                             f"{sorted(set(meta['names']) ^ set(names))}")
        if (meta["xi"], meta["clamp"]) != (self.xi, self.clamp):
            raise ValueError(f"recorder state was made with xi={meta['xi']}, clamp={meta['clamp']!r}; "
                             f"this recorder has xi={self.xi}, clamp={self.clamp!r}")
        if meta.get("rows", {}) != self._rows():
            raise ValueError("recorder state holds other rows than this rank's (saved at another world size, or "
                             "sharded differently): resume with the sharding it was saved with")
        for i, m in enumerate(self.matrices):
            self.omega[i].copy_(tensors[f"omega/{m.name}"])
            self._start[i] = (tensors[f"a_start/{m.name}"].to(m.a.device, m.a.dtype),
                              tensors[f"b_start/{m.name}"].to(m.b.device, m.b.dtype))
        self.steps, self.skipped = int(meta["steps"]), int(meta["skipped"])

    def state_path(self, path: str) -> str:
        """Where this rank's state goes: ``path`` itself, or under FSDP2 one file per rank beside it
        (``state.rank00001-of-00004.safetensors``)."""
        if self.group is None:
            return path
        rank, world = _sharding.rank_and_world(self.group)
        stem, ext = os.path.splitext(path)
        return f"{stem}.rank{rank:05d}-of-{world:05d}{ext}"

    def save_state(self, path: str) -> None:
        """Writes the running state atomically (a checkpoint beside the model's); under FSDP2 every
        rank writes its own rows (see :meth:`state_path`)."""
        state = self.state_dict()
        _io.save_atomic(self.state_path(path), state["tensors"],
                        {"format": STATE_FORMAT, "meta": json.dumps(state["meta"])})

    def load_state(self, path: str) -> None:
        tensors, meta = _io.load_checked(self.state_path(path), STATE_FORMAT)
        self.load_state_dict({"tensors": tensors, "meta": json.loads(meta["meta"])})
