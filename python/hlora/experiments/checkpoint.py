"""Step checkpoints for the CLI's training runs (``hlora record``, ``hlora finetune``): every
``every`` optimizer steps, the trainable parameters, AdamW's state, the recorder's running ω, the
loss history and torch's RNG go to one file, written atomically. Rerun with the same arguments, a
crashed run resumes from its last checkpoint and ends with what an uninterrupted one would have
(bit for bit: the batches are drawn from the seed, so the resumed run skips the ones done)."""

from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Optional

import torch

from hlora import _checks as check
from hlora._io import atomic_path

FORMAT = "hlora-step-checkpoint-1"


def file_digest(path: Optional[str]) -> Optional[str]:
    """SHA-256 of a file's bytes (``None`` for no file): an input edited between a crash and its
    resume makes another run."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class StepCheckpoint:
    """The checkpoint file of one training run.

    Args:
        path: where it lives (the CLI's: ``<out>/resume.pt``).
        settings: what the run was started with (JSON-like); a checkpoint of other settings is
            refused by name rather than resumed into a run it does not belong to.
        every: optimizer steps between checkpoints (0: none).
    """

    def __init__(self, path: str, settings: Dict[str, object], every: int) -> None:
        self.path, self.settings = path, settings
        self.every = check.count(every, "every", minimum=0)
        self._saved: Optional[Dict[str, object]] = None
        if os.path.exists(path):  # checked now, before the model loads
            self._saved = self._read()

    def _read(self) -> Dict[str, object]:
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a torn or foreign file: say which, not pickle's message
            raise ValueError(f"{self.path} is not a readable hlora checkpoint ({type(err).__name__}); "
                             "remove it to start the run again") from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not an hlora step checkpoint; remove it to start the run again")
        differ = check.differences(saved["settings"], self.settings)
        if differ:
            raise ValueError(f"{self.path} holds a run interrupted with other settings ({'; '.join(differ)}): "
                             "rerun it with those, give another --out, or remove the file to start again")
        return saved

    @property
    def step(self) -> int:
        """Optimizer steps done by the run kept (0: none)."""
        return int(self._saved["step"]) if self._saved is not None else 0

    def restore(self, params: Dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, recorder=None
                ) -> List[Dict[str, float]]:
        """Puts the kept state into ``params`` (name → trainable tensor), ``optimizer`` and
        ``recorder``; returns the loss history so far."""
        saved = self._saved
        if saved is None:
            return []
        kept = saved["params"]
        if set(kept) != set(params):
            raise ValueError(f"{self.path} holds other trainable parameters than this model's "
                             f"({sorted(set(kept) ^ set(params))[:3]} …); remove it to start again")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(kept[name])
        optimizer.load_state_dict(saved["optimizer"])
        if recorder is not None:
            recorder.load_state_dict(saved["recorder"])
        torch.set_rng_state(saved["rng"])
        return list(saved["history"])

    def maybe_save(self, step: int, steps: int, params: Dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                   recorder, history: List[Dict[str, float]]) -> None:
        """A checkpoint after ``step`` optimizer steps when one is due, and after the last (a crash
        while the outputs are written then costs no training)."""
        if self.every == 0 or (step % self.every and step < steps):
            return
        state = {"format": FORMAT, "settings": self.settings, "step": step,
                 "params": {n: p.detach().cpu().clone() for n, p in params.items()},
                 "optimizer": optimizer.state_dict(), "recorder": None if recorder is None else recorder.state_dict(),
                 "rng": torch.get_rng_state(), "history": history}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def remove(self) -> None:
        """Once the run's outputs are written."""
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._saved = None
