"""ImportanceRecorder in a hand-written loop: ω against an independent float64 recomputation
from per-step snapshots, skipped steps, resume state, several general tasks."""

from __future__ import annotations

import math

import pytest
import torch

import hlora
from hlora import reference
from hlora.adapters import find_adapted

from conftest import rel_err, requires_cuda
from tiny import TokenData, batches, tiny_lora_model


def _train(model, recorder, data, steps, lr=5e-3, on_step=None, scheduler=True):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if scheduler else None
    for step, batch in zip(range(steps), batches(data, 4)):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        recorder.optimizer = opt
        recorder.before_step()
        if on_step:
            on_step(step, opt)
        opt.step()
        recorder.after_step()
        if sched:
            sched.step()
    return opt


def test_recorder_matches_float64_recomputation_from_snapshots():
    model = tiny_lora_model(seed=1)
    recorder = hlora.ImportanceRecorder(model, xi=1e-4)
    mats = find_adapted(model)
    omega64 = {m.name: torch.zeros(m.shape, dtype=torch.float64) for m in mats}
    start = {m.name: (m.a.detach().double().clone(), m.b.detach().double().clone()) for m in mats}
    pending = {}

    def snap(step, opt):
        lr = opt.param_groups[0]["lr"]
        pending.clear()
        for m in mats:
            pending[m.name] = (m.a.detach().double().clone(), m.b.detach().double().clone(),
                               m.a.grad.double().clone(), m.b.grad.double().clone(), lr)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    recorder.optimizer = opt
    for _, batch in zip(range(6), batches(TokenData(64, seed=2), 4)):
        opt.zero_grad()
        model(**batch).loss.backward()
        recorder.before_step()
        snap(0, opt)
        opt.step()
        recorder.after_step()
        sched.step()
        for m in mats:  # the reference, independently, in float64
            a0, b0, ga, gb, lr = pending[m.name]
            reference.accumulate_omega_(omega64[m.name], a0, b0, ga, gb, m.a.detach().double(),
                                        m.b.detach().double(), lr=lr, scaling=m.scaling)
    assert recorder.steps == 6 and recorder.skipped == 0
    for m, om in zip(mats, recorder.omega):
        assert float(omega64[m.name].abs().sum()) > 0
        assert rel_err(om, omega64[m.name]) <= 1e-5
    imp = recorder.finalize()
    for m in mats:
        want = reference.finalize_importance(omega64[m.name], m.a.detach().double(), m.b.detach().double(),
                                             scaling=m.scaling, xi=1e-4, a_start=start[m.name][0],
                                             b_start=start[m.name][1])
        assert rel_err(imp.matrices[m.name], want) <= 1e-5
        assert torch.equal(imp.references[m.name][0], m.a.detach())
    assert imp.meta["steps"] == 6 and imp.meta["xi"] == 1e-4 and imp.meta["adapter_r"] == 4
    assert all(float(om.abs().sum()) == 0 for om in recorder.omega), "finalize resets ω"


def test_nonfinite_gradients_and_skipped_steps_are_counted_not_accumulated():
    model = tiny_lora_model(seed=3)
    recorder = hlora.ImportanceRecorder(model, clamp="none")

    def poison(step, opt):
        if step == 2:
            mats = find_adapted(model)
            mats[0].b.grad[0, 0] = float("inf")
            for p in model.parameters():
                p.grad = None  # the optimizer then changes nothing this step

    _train(model, recorder, TokenData(64, seed=4), 5, on_step=poison)
    assert recorder.steps == 4 and recorder.skipped == 1
    assert all(torch.isfinite(om).all() for om in recorder.omega)


def test_grad_scaler_overflow_step_is_skipped():
    """A real torch.amp.GradScaler on the CPU: an overflowing step is skipped by the scaler,
    and the recorder does not accumulate it."""
    model = tiny_lora_model(seed=5)
    recorder = hlora.ImportanceRecorder(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    recorder.optimizer = opt
    for step, batch in zip(range(4), batches(TokenData(32, seed=6), 4)):
        opt.zero_grad()
        loss = model(**batch).loss * (1e38 if step == 1 else 1.0)  # overflow on step 1
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        recorder.before_step()
        scaler.step(opt)
        scaler.update()
        recorder.after_step()
    assert recorder.skipped == 1 and recorder.steps == 3
    assert all(torch.isfinite(om).all() for om in recorder.omega)


def test_clamp_policies():
    outs = {}
    for clamp in ("final", "step", "none"):
        model = tiny_lora_model(seed=7)
        recorder = hlora.ImportanceRecorder(model, clamp=clamp, xi=1e-6)
        _train(model, recorder, TokenData(64, seed=8), 6)
        if clamp == "step":
            assert all((om >= 0).all() for om in recorder.omega)
        outs[clamp] = recorder.finalize()
    assert all((om >= 0).all() for om in outs["final"].matrices.values())
    assert any((om < 0).any() for om in outs["none"].matrices.values()), "the paper's text keeps negatives"
    with pytest.raises(ValueError, match="clamp must be one of"):
        hlora.ImportanceRecorder(tiny_lora_model(), clamp="sometimes")
    with pytest.raises(ValueError, match="xi must be a finite number > 0"):
        hlora.ImportanceRecorder(tiny_lora_model(), xi=0.0)


def test_after_step_without_before_step_and_lr_sources():
    model = tiny_lora_model(seed=9)
    recorder = hlora.ImportanceRecorder(model)
    with pytest.raises(RuntimeError, match="without before_step"):
        recorder.after_step()
    with pytest.raises(ValueError, match="needs lr="):
        recorder.before_step()
    recorder.before_step(lr=1e-3)  # explicit lr works without an optimizer
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    recorder.optimizer = other
    with pytest.raises(ValueError, match="not in the optimizer"):
        recorder.before_step()


def test_split_learning_rates_use_a_and_warn_once():
    # LoRA+ puts B in a group with a larger rate; Eq. 11 has one η, so A's is used — said once.
    model = tiny_lora_model(seed=11)
    mats = find_adapted(model)
    opt = torch.optim.SGD([{"params": [m.a for m in mats], "lr": 1e-3},
                           {"params": [m.b for m in mats], "lr": 1.6e-2}])
    recorder = hlora.ImportanceRecorder(model, opt)
    with pytest.warns(UserWarning, match=r"different learning rates \(0.001, 0.016\).*uses A's") as caught:
        assert recorder._learning_rates() == [1e-3] * len(mats)
        recorder._learning_rates()
    assert len(caught) == 1


def test_an_empty_recording_says_so():
    # Every step skipped (or none taken): Ω = 0 and any penalty built on it is 0 — said, not silent.
    model = tiny_lora_model(seed=12)
    recorder = hlora.ImportanceRecorder(model)
    recorder.before_step(lr=1e-3)
    recorder.after_step(skipped=True)
    with pytest.warns(UserWarning, match=r"no optimizer step was recorded \(1 skipped\)"):
        imp = recorder.finalize()
    assert all(not bool(om.any()) for om in imp.matrices.values())
    with pytest.warns(UserWarning, match="Ω is zero for every matrix"):
        hlora.Regularizer(model, imp)


def test_a_compiled_model_records_and_is_regularized_under_the_names_of_the_model():
    """torch.compile's wrapper prefixes every module name with "_orig_mod.": recorded through it,
    an importance file fitted only compiled models, and EWC's Fisher could not find its weights."""
    from hlora.experiments.baselines.ewc import empirical_fisher

    plain_ref = tiny_lora_model(seed=13)
    plain, compiled = tiny_lora_model(seed=13), torch.compile(tiny_lora_model(seed=13), backend="eager")
    assert [m.name for m in find_adapted(compiled)] == [m.name for m in find_adapted(plain)]
    data = TokenData(16, seed=14)
    imps = []
    for model in (plain_ref, compiled):
        recorder = hlora.ImportanceRecorder(model)
        _train(model, recorder, data, steps=2)
        imps.append(recorder.finalize())
    want, got = imps
    assert got.names == want.names and not any(n.startswith("_orig_mod") for n in got.names)
    for name in want.names:  # the compiled forward computes what the plain one does
        assert rel_err(got.matrices[name], want.matrices[name]) < 1e-4
    got.check(plain)  # the file fits the plain model, and the compiled one
    regularizer = hlora.Regularizer(compiled, got)
    assert regularizer.penalty().item() == 0  # at its reference point
    with torch.no_grad():
        find_adapted(compiled)[0].b.add_(0.01)
    assert regularizer.penalty().item() > 0
    fisher = empirical_fisher(compiled, data.seqs[:2])
    assert list(fisher.matrices) == want.names


def test_state_round_trip_continues_exactly(tmp_path):
    data = TokenData(64, seed=10)
    full_model = tiny_lora_model(seed=11)
    full = hlora.ImportanceRecorder(full_model)
    _train(full_model, full, data, 6, scheduler=False)

    model = tiny_lora_model(seed=11)
    first = hlora.ImportanceRecorder(model)
    opt = _train(model, first, data, 3, scheduler=False)
    first.save_state(str(tmp_path / "state.safetensors"))
    second = hlora.ImportanceRecorder(model, opt)
    second.load_state(str(tmp_path / "state.safetensors"))
    assert second.steps == 3
    for batch in list(batches(data, 4))[3:6]:
        opt.zero_grad()
        model(**batch).loss.backward()
        second.before_step()
        opt.step()
        second.after_step()
    for x, y in zip(second.omega, full.omega):
        assert rel_err(x, y) <= 1e-5


def test_merge_sums_tasks_and_takes_later_references():
    model = tiny_lora_model(seed=12)
    recorder = hlora.ImportanceRecorder(model)
    _train(model, recorder, TokenData(32, seed=13), 4)
    first = recorder.finalize()
    _train(model, recorder, TokenData(32, seed=14), 4)
    second = recorder.finalize()
    merged = first.merge(second)
    for name in first.names:
        assert torch.allclose(merged.matrices[name], first.matrices[name] + second.matrices[name])
        assert torch.equal(merged.references[name][0], second.references[name][0])
    assert merged.meta["steps"] == 8 and merged.meta["tasks"] == 2
    norms = merged.norms()
    assert set(norms) == set(first.names) and all(math.isfinite(v) and v > 0 for v in norms.values())


def test_options_are_checked_with_errors_naming_them():
    model = tiny_lora_model(seed=61)
    for kwargs, error, message in ((dict(xi=0.0), ValueError, "xi must be a finite number > 0"),
                                   (dict(xi=float("nan")), ValueError, "xi must be a finite number > 0"),
                                   (dict(xi=True), TypeError, "xi must be a number, got bool"),  # was ξ = 1
                                   (dict(xi="1e-3"), TypeError, "xi must be a number, got str"),
                                   (dict(clamp="never"), ValueError, "clamp must be one of"),
                                   (dict(optimizer="adamw"), TypeError, "optimizer must be a torch optimizer")):
        with pytest.raises(error, match=message):
            hlora.ImportanceRecorder(model, **kwargs)
    with pytest.warns(UserWarning, match="no optimizer step was recorded"):
        empty = hlora.ImportanceRecorder(model).finalize()
    with pytest.raises(TypeError, match="other must be an hlora.Importance, got dict"):
        empty.merge(dict(empty.matrices))


@requires_cuda
def test_a_recorder_made_before_the_model_moved_to_cuda_follows_it():
    model = tiny_lora_model(seed=62)
    early = hlora.ImportanceRecorder(model)  # ω and the start factors on the CPU
    model.cuda()
    late = hlora.ImportanceRecorder(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    early.optimizer = late.optimizer = opt
    for batch in list(batches(TokenData(32, seed=63), 4))[:3]:
        opt.zero_grad()
        model(**{k: v.cuda() for k, v in batch.items()}).loss.backward()
        early.before_step()
        late.before_step()
        opt.step()
        assert early.after_step() and late.after_step()
    got, want = early.finalize(), late.finalize()
    assert any(float(om.abs().sum()) > 0 for om in want.matrices.values())
    for name in want.names:
        assert got.matrices[name].is_cuda and torch.equal(got.matrices[name], want.matrices[name])
