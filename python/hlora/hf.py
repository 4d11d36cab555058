"""transformers ``Trainer`` integration: record importance on general data, regularize the
domain fine-tuning — a callback each, plus a Trainer mixin for when the penalty must pass through
gradient clipping and loss scaling or reach the ``report_to`` integrations.

Record (general task ν)::

    cb = hlora.hf.ImportanceCallback("importance.safetensors", xi=1e-3)
    Trainer(model, args, train_dataset=general, callbacks=[cb]).train()

Fine-tune (domain task μ), continuing the adapter::

    reg = hlora.hf.RegularizationCallback("importance.safetensors", phi=1e3)
    Trainer(model, args, train_dataset=domain, callbacks=[reg]).train()

Which to use: ``RegularizationCallback`` adds the penalty's gradient right before
``optimizer.step()`` — after the Trainer's gradient clipping and fp16 unscaling — and writes
``hlora/penalty`` and ``hlora/task_loss`` into ``trainer.state.log_history``. Use
:class:`HLoRATrainer` (or :class:`RegularizedTrainerMixin` on your own Trainer subclass) when
clipping should include the penalty, or when ``report_to`` backends (W&B, TensorBoard — callbacks
that run before yours) should see the hlora values.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

import torch
from transformers import Trainer, TrainerCallback

from hlora._io import write_json_atomic
from hlora.importance import Importance, check_save_dtype, read_header
from hlora.recorder import DEFAULT_XI, ImportanceRecorder, check_recorder_options
from hlora.regularizer import DEFAULT_PHI, Regularizer, check_regularizer_options

RECORDER_STATE_FILE = "hlora_recorder.safetensors"
#: The regularizer's resolved anchor, saved with checkpoints: after a resume the adapter has moved
#: away from the reference factors, so "auto" could no longer tell the two set-ups apart.
REGULARIZER_STATE_FILE = "hlora_regularizer.json"

__all__ = ["ImportanceCallback", "RegularizationCallback", "RegularizedTrainerMixin", "HLoRATrainer",
           "RECORDER_STATE_FILE", "REGULARIZER_STATE_FILE"]


SUPPORTED = ("Supported: single-process, DDP (torchrun / torch.distributed) and FSDP2 (fully_shard; "
             "TrainingArguments(fsdp=True, fsdp_config={\"version\": 2}))")


def fsdp_version(args: Any) -> Optional[int]:
    """The FSDP version a Trainer's arguments ask for (None: no FSDP). transformers 5 reads
    ``fsdp_config["version"]`` (default 2); 4.x leaves it to accelerate, which reads
    ``FSDP_VERSION`` (``accelerate launch --fsdp_version 2``; default 1)."""
    if not getattr(args, "fsdp", None):
        return None
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return int((getattr(args, "fsdp_config", None) or {}).get("version", 2))
    return int(os.environ.get("FSDP_VERSION", "1"))


def refuse_sharded_training(args: Any) -> None:
    """FSDP2 shards each LoRA factor by whole rows, which hlora follows (ω, Ω and B_ref as each
    rank's rows). FSDP1 and DeepSpeed ZeRO flatten parameters, cutting rows apart (and DeepSpeed
    runs the optimizer step inside backward, so a callback never sees the gradients first)."""
    version = fsdp_version(args)
    if version is not None and version != 2:
        raise ValueError(f"hlora does not support FSDP{version}: it flattens the LoRA factors, cutting their rows "
                         f"apart. {SUPPORTED}.")
    if getattr(args, "deepspeed", None):
        raise ValueError(f"hlora does not support DeepSpeed ZeRO: it flattens the LoRA factors and steps the "
                         f"optimizer inside backward. {SUPPORTED}.")


def _check_importance(importance: Union[Importance, str, os.PathLike]) -> Union[Importance, str]:
    """An Importance, or the path of a saved one after checking it is one (its tensors are read
    when training begins: under FSDP2 each rank reads only its rows)."""
    if isinstance(importance, Importance):
        return importance
    if not isinstance(importance, (str, os.PathLike)):
        raise TypeError(f"importance must be an hlora.Importance or the path of a saved one, "
                        f"got {type(importance).__name__}")
    read_header(os.fspath(importance))
    return os.fspath(importance)


class ImportanceCallback(TrainerCallback):
    """Records ω at every optimizer step of a general-data run and finalizes Ω at train end.

    ``callback.importance`` holds the result; with ``save_path`` rank 0 also writes it
    (atomically; ``save_dtype=torch.bfloat16`` halves Ω's bytes). Its running state is saved
    beside every Trainer checkpoint and restored on ``resume_from_checkpoint``.
    """

    def __init__(self, save_path: Optional[str] = None, *, xi: float = DEFAULT_XI, clamp: str = "final",
                 adapter: str = "default", save_dtype: Optional[torch.dtype] = None) -> None:
        # Checked now, not when the Trainer starts (xi, clamp) or ends (save_path, save_dtype):
        # a bad one must not cost the run.
        check_recorder_options(xi, clamp)
        if save_path is not None and not isinstance(save_path, (str, os.PathLike)):
            raise TypeError(f"save_path must be a file path (str or os.PathLike), got {type(save_path).__name__}")
        check_save_dtype(save_dtype, "save_dtype")
        if save_path is not None and os.path.isdir(save_path):
            raise ValueError(f"save_path {save_path!r} is a folder; give the importance file's path, "
                             "e.g. importance.safetensors inside it")
        self.save_path, self.xi, self.clamp, self.adapter, self.save_dtype = save_path, xi, clamp, adapter, save_dtype
        self.recorder: Optional[ImportanceRecorder] = None
        self.importance: Optional[Importance] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        refuse_sharded_training(args)
        if self.save_path and state.is_world_process_zero:  # its folder, before the first step
            os.makedirs(os.path.dirname(os.path.abspath(self.save_path)), exist_ok=True)
        self.recorder = ImportanceRecorder(model, optimizer, adapter=self.adapter, xi=self.xi, clamp=self.clamp)
        if state.global_step > 0:  # resuming: the Trainer restored step, model and optimizer
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", RECORDER_STATE_FILE)
            if not os.path.isfile(self.recorder.state_path(path)):
                raise FileNotFoundError(f"resuming at step {state.global_step}, but the checkpoint has no hlora "
                                        f"recorder state ({self.recorder.state_path(path)}); Ω cannot be continued")
            self.recorder.load_state(path)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.recorder.optimizer = optimizer
        self.recorder.before_step()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # fp16 loss scaling skips steps whose gradients overflowed.
        self.recorder.after_step(skipped=bool(getattr(optimizer, "step_was_skipped", False)))

    def on_save(self, args, state, control, **kwargs):
        # Under FSDP2 every rank saves its rows (a file each); otherwise the state is the same
        # on every rank and rank 0 writes it.
        if state.is_world_process_zero or self.recorder.group is not None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self.recorder.save_state(os.path.join(folder, RECORDER_STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        self.importance = self.recorder.finalize()
        if self.save_path and (state.is_world_process_zero or self.importance.is_sharded):
            self.importance.save(self.save_path, dtype=self.save_dtype)  # sharded: every rank together


class _PenaltyLog:
    """Mean penalty over the optimizer steps since the last log. Summed on the penalty's device
    and read only when logging: a float() per step would wait for the GPU every step."""

    def __init__(self) -> None:
        self.total: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, value: torch.Tensor) -> None:
        value = value.detach()
        self.total = value if self.total is None else self.total + value
        self.count += 1

    def drain_into(self, logs: dict, regularizer: Optional[Regularizer]) -> None:
        if self.count and self.total is not None and "loss" in logs:
            total = regularizer.total(self.total) if regularizer is not None else self.total  # FSDP2: all ranks'
            logs["hlora/penalty"] = float(total) / self.count
            logs["hlora/task_loss"] = logs["loss"]
            self.total, self.count = None, 0


class RegularizationCallback(TrainerCallback):
    """Adds φ·Σ c_l·P_l once per optimizer step (whatever ``gradient_accumulation_steps``), as a
    gradient right before ``optimizer.step()``; logs ``hlora/penalty`` and ``hlora/task_loss``.

    ``importance`` is an :class:`~hlora.Importance` or the path of a saved one; the other
    arguments are :class:`~hlora.Regularizer`'s.
    """

    def __init__(self, importance: Union[Importance, str, os.PathLike], *, phi: float = DEFAULT_PHI,
                 layer_weighting: str = "softmax", temperature: Union[str, float] = "auto",
                 adapter: str = "default", anchor: str = "auto") -> None:
        check_regularizer_options(phi, layer_weighting, temperature, anchor)  # now, not at train begin
        self._source = _check_importance(importance)
        #: The importance the penalty uses (read from its file when training begins).
        self.importance: Optional[Importance] = importance if isinstance(importance, Importance) else None
        self.options = dict(phi=phi, layer_weighting=layer_weighting, temperature=temperature, adapter=adapter,
                            anchor=anchor)
        self.regularizer: Optional[Regularizer] = None
        self._log = _PenaltyLog()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        refuse_sharded_training(args)
        if self.regularizer is None:
            options = dict(self.options)
            saved = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", REGULARIZER_STATE_FILE)
            if state.global_step > 0 and options["anchor"] == "auto" and os.path.isfile(saved):
                with open(saved) as f:
                    options["anchor"] = json.load(f)["anchor"]
            if self.importance is None:
                self.importance = Importance.load(self._source, shard_for=model, adapter=options["adapter"])
            self.regularizer = Regularizer(model, self.importance, **options)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.regularizer is not None:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", REGULARIZER_STATE_FILE)
            write_json_atomic(path, {"anchor": self.regularizer.anchor})

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        value = self.regularizer.penalty()
        value.backward()
        self._log.add(value)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        self._log.drain_into(logs, self.regularizer)
        # Trainer.log appended its own copy to log_history before calling us: extend that entry.
        if state.log_history and "hlora/penalty" in logs:
            state.log_history[-1].update({k: v for k, v in logs.items() if k.startswith("hlora/")})


class RegularizedTrainerMixin:
    """Adds the hlora penalty inside ``training_step`` on the micro-batch that completes an
    optimizer step, through ``accelerator.backward`` — so fp16 loss scaling and gradient
    clipping include it — and puts ``hlora/penalty``/``hlora/task_loss`` into the logs before
    any ``report_to`` integration sees them.

    Use ``class MyTrainer(RegularizedTrainerMixin, Trainer)`` and pass ``hlora_regularizer=`` (a
    :class:`~hlora.Regularizer`) to the constructor, or set ``trainer.hlora_regularizer`` later.
    """

    def __init__(self, *args: Any, hlora_regularizer: Optional[Regularizer] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hlora_regularizer = hlora_regularizer
        self._hlora_log = _PenaltyLog()
        refuse_sharded_training(self.args)

    @property
    def hlora_regularizer(self) -> Optional[Regularizer]:
        return self._hlora_regularizer

    @hlora_regularizer.setter
    def hlora_regularizer(self, regularizer: Optional[Regularizer]) -> None:
        # A regularizer built on another copy of the model would add a penalty whose gradient
        # reaches parameters this Trainer never steps: no error, just no regularization.
        if regularizer is not None:
            if not isinstance(regularizer, Regularizer):
                raise TypeError(f"hlora_regularizer must be an hlora.Regularizer, got {type(regularizer).__name__}")
            if not regularizer.uses_parameters_of(self.model):
                raise ValueError("hlora_regularizer was built on another model than the one this Trainer trains: "
                                 "build it with hlora.Regularizer(trainer_model, importance)")
        self._hlora_regularizer = regularizer
        self._hlora_model: Optional[torch.nn.Module] = None  # the model training_step last checked it against

    def training_step(self, model, inputs, *args, **kwargs):
        # Passed through as given: Trainer.training_step's arguments have changed between releases.
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.hlora_regularizer is not None and model is not self._hlora_model:
            # Under FSDP2, accelerate's prepare replaced every parameter (with sharded DTensors)
            # after the regularizer was built: rebuild it on the parameters being trained.
            if not self.hlora_regularizer.uses_parameters_of(model):
                self._hlora_regularizer = self.hlora_regularizer.rebuilt_for(model)
            self._hlora_model = model
        if self.hlora_regularizer is not None and self.accelerator.sync_gradients:
            value = self.hlora_regularizer.penalty()
            self.accelerator.backward(value)
            self._hlora_log.add(value)
        return loss

    def log(self, logs, *args, **kwargs):
        self._hlora_log.drain_into(logs, self.hlora_regularizer)
        return super().log(logs, *args, **kwargs)


class HLoRATrainer(RegularizedTrainerMixin, Trainer):
    """``transformers.Trainer`` with the hlora penalty (see :class:`RegularizedTrainerMixin`)."""
