"""The transformers Trainer integration with real Trainer runs on a tiny random Llama: hook
placement (recomputed independently), logging, gradient accumulation, φ's effect, the mixin,
resume, and refusing sharded training."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import hlora
from hlora import reference
from hlora.adapters import find_adapted
from hlora.hf import (
    RECORDER_STATE_FILE,
    HLoRATrainer,
    ImportanceCallback,
    RegularizationCallback,
    refuse_sharded_training,
)

from conftest import rel_err, requires_cuda
from tiny import TokenData, tiny_lora_model


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
                logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                disable_tqdm=True, lr_scheduler_type="linear", max_grad_norm=1.0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


class Spy(TrainerCallback):
    """Snapshots what the optimizer sees at every step, for an independent float64 recomputation."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        self._pending = [(m.a.detach().double().clone(), m.b.detach().double().clone(),
                          m.a.grad.double().clone(), m.b.grad.double().clone()) for m in find_adapted(model)]
        self._lr = optimizer.param_groups[0]["lr"]

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        after = [(m.a.detach().double().clone(), m.b.detach().double().clone()) for m in find_adapted(model)]
        self.steps.append((self._pending, after, self._lr))


def _record_with_trainer(tmp_path, save_path=None, **kw):
    model = tiny_lora_model(seed=40)
    cb = ImportanceCallback(save_path, xi=1e-3)
    spy = Spy()
    trainer = Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=TokenData(64, seed=41),
                      callbacks=[cb, spy])
    trainer.train()
    return model, cb, spy, trainer


# The Trainer's torch_compile compiles the model (dynamo + AOT autograd; "aot_eager" leaves out only
# inductor's code generation); recording runs in the callbacks around it, in eager mode.
COMPILED = dict(torch_compile=True, torch_compile_backend="aot_eager")


@pytest.fixture(autouse=True)
def _environment_restored():
    """TrainingArguments(torch_compile=True) exports ACCELERATE_DYNAMO_BACKEND (and _MODE) to
    os.environ: without this, every later Trainer in the process would compile its model too."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("setup", [{}, dict(bf16=True, gradient_accumulation_steps=2, gradient_checkpointing=True,
                                             # transformers 4.x's default (reentrant) leaves LoRA without grads
                                             gradient_checkpointing_kwargs={"use_reentrant": False}),
                                   COMPILED],
                         ids=["plain", "bf16-autocast+checkpointing+accumulation", "torch.compile"])
def test_importance_callback_equals_recomputation_from_what_the_optimizer_saw(tmp_path, setup):
    model, cb, spy, _ = _record_with_trainer(tmp_path, save_path=str(tmp_path / "imp.safetensors"), **setup)
    mats = find_adapted(model)
    assert len(spy.steps) == 6 and cb.importance.meta["steps"] == 6
    assert len({lr for _, _, lr in spy.steps}) > 1, "the linear schedule changes lr: each step uses its own"
    for i, m in enumerate(mats):
        omega = torch.zeros(m.shape, dtype=torch.float64)
        for before, after, lr in spy.steps:
            a0, b0, ga, gb = before[i]
            reference.accumulate_omega_(omega, a0, b0, ga, gb, *after[i], lr=lr, scaling=m.scaling)
        start_a, start_b = spy.steps[0][0][i][:2]
        want = reference.finalize_importance(omega, m.a.detach().double(), m.b.detach().double(), scaling=m.scaling,
                                             xi=1e-3, a_start=start_a, b_start=start_b)
        assert float(want.sum()) > 0
        assert rel_err(cb.importance.matrices[m.name], want) <= 1e-5
    on_disk = hlora.Importance.load(str(tmp_path / "imp.safetensors"))
    assert all(torch.equal(on_disk.matrices[n], cb.importance.matrices[n]) for n in on_disk.names)


def _swap_lora_parameters(model) -> None:
    """What FSDP2's fully_shard (in accelerate's prepare) does to every parameter: a new object."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".lora_A." in name or ".lora_B." in name):
            module.weight = torch.nn.Parameter(module.weight.detach().clone())


def _finetune(tmp_path, importance, phi, mixin=False, gas=1, bs=4, steps=8, seed_model=40, callbacks=(),
              swap_before_training=False, **kw):
    model = tiny_lora_model(seed=seed_model)
    # continue the ν adapter: load its reference factors into the fresh model
    with torch.no_grad():
        for m in find_adapted(model):
            m.a.copy_(importance.references[m.name][0])
            m.b.copy_(importance.references[m.name][1])
    args = _args(tmp_path, max_steps=steps, gradient_accumulation_steps=gas, per_device_train_batch_size=bs,
                 max_grad_norm=0.0, lr_scheduler_type="constant", **kw)
    data = TokenData(64, seed=99)  # another "domain"
    if mixin:
        trainer = HLoRATrainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks),
                               hlora_regularizer=hlora.Regularizer(model, importance, phi=phi))
        if swap_before_training:
            _swap_lora_parameters(model)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          callbacks=[RegularizationCallback(importance, phi=phi), *callbacks])
    trainer.train()
    return model, trainer


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    _, cb, _, _ = _record_with_trainer(tmp_path_factory.mktemp("rec"))
    return cb.importance


def _weighted_drift(model, importance):
    total = 0.0
    for m in find_adapted(model):
        a_ref, b_ref = importance.references[m.name]
        total += float(reference.importance_penalty(importance.matrices[m.name].double(), m.a.detach().double().cpu(),
                                                    m.b.detach().double().cpu(), a_ref.double(), b_ref.double(),
                                                    scaling=m.scaling))
    return total


def test_penalty_reaches_log_history_and_holds_weights(tmp_path, recorded):
    free, trainer_free = _finetune(tmp_path / "free", recorded, phi=0.0)
    held, trainer_held = _finetune(tmp_path / "held", recorded, phi=1e6)
    logged = [e for e in trainer_held.state.log_history if "hlora/penalty" in e]
    assert len(logged) == 8
    assert all("hlora/task_loss" in e and e["hlora/task_loss"] == e["loss"] for e in logged)
    assert logged[0]["hlora/penalty"] == 0.0 and any(e["hlora/penalty"] > 0 for e in logged)
    assert _weighted_drift(held, recorded) < 0.1 * _weighted_drift(free, recorded)


@requires_cuda
def test_mixin_on_cuda_with_the_regularizer_built_before_the_trainer_placed_the_model(tmp_path, recorded):
    """The README's pattern on a GPU: hlora.Regularizer(model, imp) runs on the CPU model, before
    HLoRATrainer moves it; the penalty follows the model there."""
    held, trainer = _finetune(tmp_path / "held", recorded, phi=1e6, mixin=True, use_cpu=False)
    assert next(held.parameters()).is_cuda
    logged = [e["hlora/penalty"] for e in trainer.state.log_history if "hlora/penalty" in e]
    assert len(logged) == 8 and any(v > 0 for v in logged)
    free, _ = _finetune(tmp_path / "free", recorded, phi=0.0, mixin=True, use_cpu=False)
    assert _weighted_drift(held, recorded) < 0.1 * _weighted_drift(free, recorded)


def test_mixin_refuses_a_regularizer_it_could_not_apply(tmp_path, recorded):
    # Built on another copy of the model, its penalty's gradient would reach parameters the
    # Trainer never steps: the run would be unregularized, without a word.
    model, other = tiny_lora_model(seed=40), tiny_lora_model(seed=40)
    kw = dict(model=model, args=_args(tmp_path, max_steps=1), train_dataset=TokenData(8))
    with pytest.raises(ValueError, match="built on another model"):
        HLoRATrainer(**kw, hlora_regularizer=hlora.Regularizer(other, recorded))
    with pytest.raises(TypeError, match="hlora_regularizer must be an hlora.Regularizer, got str"):
        HLoRATrainer(**kw, hlora_regularizer="importance.safetensors")
    trainer = HLoRATrainer(**kw)
    with pytest.raises(ValueError, match="built on another model"):
        trainer.hlora_regularizer = hlora.Regularizer(other, recorded)
    trainer.hlora_regularizer = hlora.Regularizer(model, recorded)  # set later, as the docstring allows
    assert trainer.hlora_regularizer.matrices[0].a is find_adapted(model)[0].a


def test_mixin_follows_parameters_replaced_after_the_regularizer_was_built(tmp_path, recorded):
    # accelerate's FSDP2 prepare replaces every parameter after HLoRATrainer got its regularizer;
    # a penalty on the old objects would regularize nothing. Here the swap on one process.
    want, _ = _finetune(tmp_path / "plain", recorded, phi=1e6, mixin=True)
    swapped, trainer = _finetune(tmp_path / "swapped", recorded, phi=1e6, mixin=True, swap_before_training=True)
    assert trainer.hlora_regularizer.uses_parameters_of(swapped)
    for got, expect in zip(find_adapted(swapped), find_adapted(want)):
        assert torch.equal(got.a, expect.a) and torch.equal(got.b, expect.b), got.name
    free, _ = _finetune(tmp_path / "free", recorded, phi=0.0, mixin=True)
    assert _weighted_drift(swapped, recorded) < 0.1 * _weighted_drift(free, recorded)


def test_gradient_accumulation_applies_the_penalty_once_per_step(tmp_path, recorded):
    _, one = _finetune(tmp_path / "ga1", recorded, phi=1e4, gas=1, bs=4, steps=5)
    _, four = _finetune(tmp_path / "ga4", recorded, phi=1e4, gas=4, bs=1, steps=5)
    p1 = [e["hlora/penalty"] for e in one.state.log_history if "hlora/penalty" in e]
    p4 = [e["hlora/penalty"] for e in four.state.log_history if "hlora/penalty" in e]
    assert len(p1) == len(p4) == 5
    assert p1[-1] > 0
    for x, y in zip(p1[1:], p4[1:]):
        assert abs(x - y) <= 1e-3 * max(abs(x), 1e-12)


def test_penalty_under_a_compiled_model_trains_as_without(tmp_path, recorded):
    """HLoRATrainer with the Trainer's torch_compile: the penalty (computed beside the compiled
    forward, its gradient through the same backward) gives the uncompiled run's steps."""
    eager_model, eager = _finetune(tmp_path / "eager", recorded, phi=1e4, steps=4, mixin=True)
    compiled_model, compiled = _finetune(tmp_path / "compiled", recorded, phi=1e4, steps=4, mixin=True, **COMPILED)
    assert type(compiled.model_wrapped).__name__ == "OptimizedModule"  # the model did run compiled
    want = [e["hlora/penalty"] for e in eager.state.log_history if "hlora/penalty" in e]
    got = [e["hlora/penalty"] for e in compiled.state.log_history if "hlora/penalty" in e]
    assert len(got) == 4 and got[-1] > 0
    assert got == pytest.approx(want, rel=1e-5)
    for m, e in zip(find_adapted(compiled_model), find_adapted(eager_model)):
        assert rel_err(m.b.detach(), e.b.detach()) <= 1e-5 and rel_err(m.a.detach(), e.a.detach()) <= 1e-5


class LogSpy(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.seen.append(dict(logs))


def test_mixin_logs_before_callbacks_and_matches_the_callback(tmp_path, recorded):
    cb_spy, mx_spy = LogSpy(), LogSpy()
    _, with_cb = _finetune(tmp_path / "cb", recorded, phi=1e4, steps=4, callbacks=[cb_spy])
    _, mixin = _finetune(tmp_path / "mx", recorded, phi=1e4, steps=4, mixin=True, callbacks=[mx_spy])
    # Callbacks (report_to integrations among them) see the mixin's values in the logs they get.
    assert sum("hlora/penalty" in logs for logs in mx_spy.seen) == 4
    from_cb = [e["hlora/penalty"] for e in with_cb.state.log_history if "hlora/penalty" in e]
    from_mx = [e["hlora/penalty"] for e in mixin.state.log_history if "hlora/penalty" in e]
    assert len(from_mx) == 4
    for x, y in zip(from_cb, from_mx):
        assert abs(x - y) <= 1e-4 * max(abs(x), 1e-12)


def test_resume_gives_the_same_importance_as_an_uninterrupted_run(tmp_path):
    def run(out, resume=False, stop_at=None, max_steps=6):
        model = tiny_lora_model(seed=50)
        cb = ImportanceCallback(xi=1e-3)
        callbacks = [cb]
        if stop_at:
            class Crash(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    if state.global_step == stop_at:
                        raise KeyboardInterrupt("simulated crash")
            callbacks.append(Crash())
        args = _args(out, max_steps=max_steps, save_strategy="steps", save_steps=3, lr_scheduler_type="constant")
        trainer = Trainer(model=model, args=args, train_dataset=TokenData(64, seed=51), callbacks=callbacks)
        try:
            trainer.train(resume_from_checkpoint=resume or None)
        except KeyboardInterrupt:
            return None
        return cb.importance

    full = run(tmp_path / "full")
    assert run(tmp_path / "crash", stop_at=4) is None
    assert os.path.isfile(tmp_path / "crash" / "out" / "checkpoint-3" / RECORDER_STATE_FILE)
    resumed = run(tmp_path / "crash", resume=True)
    assert resumed.meta["steps"] == full.meta["steps"] == 6
    for name in full.names:
        assert rel_err(resumed.matrices[name], full.matrices[name]) <= 1e-5


def test_regularized_run_resumes_with_its_anchor(tmp_path, recorded):
    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt("simulated crash")

    def trainer(callbacks, steps=5):
        model = tiny_lora_model(seed=40)
        with torch.no_grad():
            for m in find_adapted(model):
                m.a.copy_(recorded.references[m.name][0])
                m.b.copy_(recorded.references[m.name][1])
        args = _args(tmp_path, max_steps=steps, save_strategy="steps", save_steps=2, lr_scheduler_type="constant")
        return Trainer(model=model, args=args, train_dataset=TokenData(64, seed=99),
                       callbacks=[RegularizationCallback(recorded, phi=1e4), *callbacks])

    with pytest.raises(KeyboardInterrupt):
        trainer([Crash()]).train()
    assert os.path.isfile(tmp_path / "out" / "checkpoint-2" / "hlora_regularizer.json")
    resumed = trainer([])
    resumed.train(resume_from_checkpoint=True)  # "auto" alone would refuse the moved adapter
    logged = [e["hlora/penalty"] for e in resumed.state.log_history if "hlora/penalty" in e]
    assert logged and logged[-1] > 0


def test_importance_callback_refuses_what_would_fail_at_train_end(tmp_path):
    # save_path and save_dtype are only used after the last step, xi and clamp when training
    # starts: all checked when the callback is made.
    with pytest.raises(ValueError, match="xi must be a finite number > 0"):
        ImportanceCallback(xi=-1e-3)
    with pytest.raises(ValueError, match="clamp must be one of"):
        ImportanceCallback(clamp="always")
    with pytest.raises(TypeError, match="save_path must be a file path"):
        ImportanceCallback(1e-3)  # ξ given where the path goes
    with pytest.raises(ValueError, match="save_path .* is a folder"):
        ImportanceCallback(str(tmp_path))
    with pytest.raises(TypeError, match="save_dtype must be a floating dtype"):
        ImportanceCallback(str(tmp_path / "importance.safetensors"), save_dtype=torch.int8)
    # A folder that cannot be made stops the run before its first step, not after its last.
    (tmp_path / "a-file").write_text("")
    cb = ImportanceCallback(str(tmp_path / "a-file" / "importance.safetensors"))
    trainer = Trainer(model=tiny_lora_model(seed=40), args=_args(tmp_path, max_steps=2),
                      train_dataset=TokenData(16, seed=41), callbacks=[cb])
    with pytest.raises(OSError, match="a-file"):  # FileExistsError: a file where its folder should be
        trainer.train()
    assert trainer.state.global_step == 0


def test_regularization_callback_checks_its_options_when_made(recorded):
    with pytest.raises(ValueError, match="phi must be a finite number >= 0"):
        RegularizationCallback(recorded, phi=-1.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        RegularizationCallback(recorded, temperature=0)
    with pytest.raises(ValueError, match="anchor must be one of"):
        RegularizationCallback(recorded, anchor="start")
    with pytest.raises(TypeError, match="importance must be an hlora.Importance or the path of a saved one"):
        RegularizationCallback(dict(recorded.matrices))


def test_resume_without_recorder_state_is_refused(tmp_path):
    model = tiny_lora_model(seed=52)
    args = _args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
    Trainer(model=model, args=args, train_dataset=TokenData(32, seed=53)).train()
    args = _args(tmp_path, max_steps=5, save_strategy="steps", save_steps=3)
    trainer = Trainer(model=tiny_lora_model(seed=52), args=args, train_dataset=TokenData(32, seed=53),
                      callbacks=[ImportanceCallback()])
    with pytest.raises(FileNotFoundError, match="no hlora recorder state"):
        trainer.train(resume_from_checkpoint=True)


def test_fsdp1_and_deepspeed_are_refused_naming_fsdp2(monkeypatch):
    # transformers 5 reads the version from fsdp_config, 4.x leaves it to accelerate (FSDP_VERSION)
    monkeypatch.setenv("FSDP_VERSION", "2")
    refuse_sharded_training(SimpleNamespace(fsdp=True, fsdp_config={"version": 2}, deepspeed=None))  # FSDP2: fine
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="does not support FSDP1.*FSDP2"):
        refuse_sharded_training(SimpleNamespace(fsdp=True, fsdp_config={"version": 1}, deepspeed=None))
    with pytest.raises(ValueError, match="DeepSpeed ZeRO.*FSDP2"):
        refuse_sharded_training(SimpleNamespace(fsdp=None, fsdp_config=None, deepspeed="ds.json"))
    refuse_sharded_training(SimpleNamespace(fsdp="", fsdp_config=None, deepspeed=None))  # no sharding
