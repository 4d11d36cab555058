"""Regularizer: the penalty and its gradient against autograd of the reference, layer
coefficients, temperature, and both domain set-ups (continue the adapter / fresh adapter)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import hlora
from hlora import reference
from hlora.adapters import find_adapted

from conftest import rel_err
from tiny import TokenData, batches, tiny_lora_model


def _record(model, steps=4, seed=31):
    recorder = hlora.ImportanceRecorder(model, xi=1e-3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    recorder.optimizer = opt
    for batch in list(batches(TokenData(64, seed=seed), 4))[:steps]:
        opt.zero_grad()
        model(**batch).loss.backward()
        recorder.before_step()
        opt.step()
        recorder.after_step()
    return recorder.finalize()


def _drift(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in find_adapted(model):
            m.a.add_(torch.randn(m.a.shape, generator=g) * scale)
            m.b.add_(torch.randn(m.b.shape, generator=g) * scale)


def test_penalty_and_gradients_match_reference_autograd():
    model = tiny_lora_model(seed=30)
    imp = _record(model)
    reg = hlora.Regularizer(model, imp, phi=7.0)
    assert reg.anchor == "reference"
    assert float(reg.penalty().detach()) == 0.0, "continuing the ν adapter: P starts at 0"
    _drift(model)
    model.zero_grad(set_to_none=True)
    mats = find_adapted(model)
    value = reg.penalty()
    value.backward()
    assert reg.last_value == float(value.detach()) > 0
    got = {m.name: (m.a.grad.clone(), m.b.grad.clone()) for m in mats}
    total = 0
    leaves = {}
    for m, c in zip(mats, reg.coefficients):
        a = m.a.detach().double().requires_grad_()
        b = m.b.detach().double().requires_grad_()
        leaves[m.name] = (a, b)
        a_ref, b_ref = imp.references[m.name]
        total = total + 7.0 * float(c) * reference.importance_penalty(
            imp.matrices[m.name].double(), a, b, a_ref.double(), b_ref.double(), scaling=m.scaling)
    total.backward()
    assert rel_err(value, total) <= 1e-5
    for name, (a, b) in leaves.items():
        assert float(got[name][0].abs().sum()) > 0 and float(got[name][1].abs().sum()) > 0
        assert rel_err(got[name][0], a.grad) <= 1e-5
        assert rel_err(got[name][1], b.grad) <= 1e-5


def test_a_compiled_training_step_calling_the_penalty_gives_the_eager_step():
    """torch.compile of a whole step that calls reg.penalty(): dynamo cannot trace the native call,
    so the graph breaks there (docs/training.md), and loss and gradients are the eager step's."""
    model = tiny_lora_model(seed=36)
    reg = hlora.Regularizer(model, _record(model), phi=1e3)
    _drift(model)
    batch = next(iter(batches(TokenData(8, seed=37), 4)))

    def step():
        loss = model(**batch).loss + reg.penalty()
        loss.backward()
        return loss.detach()

    results = []
    for run in (step, torch.compile(step, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        loss = run()
        results.append((loss, [g.clone() for m in find_adapted(model) for g in (m.a.grad, m.b.grad)]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert reg.last_value > 0
    assert rel_err(compiled_loss, eager_loss) <= 1e-6
    for got, want in zip(compiled_grads, eager_grads):
        assert float(want.abs().sum()) > 0 and rel_err(got, want) <= 1e-5


def test_layer_coefficients_and_temperature():
    model = tiny_lora_model(seed=32)
    imp = _record(model)
    norms = torch.tensor(list(imp.norms().values()), dtype=torch.float64)
    auto = hlora.Regularizer(model, imp)
    assert auto.temperature == pytest.approx(float(norms.mean()))
    assert torch.allclose(auto.coefficients, torch.softmax(norms / norms.mean(), 0), rtol=1e-6)
    uniform = hlora.Regularizer(model, imp, layer_weighting="uniform")
    assert torch.allclose(uniform.coefficients, torch.full((len(norms),), 1 / len(norms), dtype=torch.float64))
    literal = hlora.Regularizer(model, imp, temperature=1e-6 * float(norms.min()))
    assert float(literal.coefficients.max()) == pytest.approx(1.0), "tiny T: one matrix takes all the weight"
    assert set(auto.coefficient_map()) == set(imp.names)
    for bad in ({"phi": -1.0}, {"layer_weighting": "max"}, {"temperature": 0.0}, {"temperature": "hot"},
                {"anchor": "middle"}):
        with pytest.raises(ValueError):
            hlora.Regularizer(model, imp, **bad)


@pytest.mark.parametrize("rank", [4, 8], ids=["same rank", "another rank"])
def test_fresh_adapter_on_the_merged_model(rank):
    """The importance's reference factors are not the anchor here, so a fresh adapter of another
    rank than the recorded one takes it too (it was refused as mis-shaped)."""
    model = tiny_lora_model(seed=33)  # r = 4
    imp = _record(model)
    merged = model.merge_and_unload()
    fresh = get_peft_model(merged, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                              lora_dropout=0.0))
    reg = hlora.Regularizer(fresh, imp, phi=1.0)
    assert reg.anchor == "zero"
    assert float(reg.penalty().detach()) == 0.0, "B = 0: no drift from the merged model yet"
    _drift(fresh)
    value = reg.penalty()
    mats = find_adapted(fresh)
    want = sum(float(c) * reference.importance_penalty(imp.matrices[m.name].double(), m.a.detach().double(),
                                                      m.b.detach().double(), scaling=m.scaling)
               for m, c in zip(mats, reg.coefficients))
    assert rel_err(value, want) <= 1e-5


@pytest.mark.parametrize("rank", [2, 8], ids=["lower rank", "higher rank"])
def test_an_adapter_of_another_rank_is_anchored_at_the_recorded_one(rank):
    """A fresh adapter of another rank on the base model (not merged), anchored at the general
    task's adapter: D = s·B·A − s_ref·B_ref·A_ref with the smaller pair zero-padded."""
    recorded = tiny_lora_model(seed=35)  # r = 4, α = 8
    imp = _record(recorded)
    base = recorded.unload()  # the ν adapter removed, not merged
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=3 * rank, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))
    _drift(model, seed=1)
    reg = hlora.Regularizer(model, imp, phi=3.0, anchor="reference")
    value = reg.penalty()
    value.backward()
    want = 0
    leaves = {}
    for m, c in zip(find_adapted(model), reg.coefficients):
        a = m.a.detach().double().requires_grad_()
        b = m.b.detach().double().requires_grad_()
        leaves[m.name] = (m, a, b)
        a_ref, b_ref = (t.double() for t in imp.references[m.name])
        assert a_ref.shape[0] == 4 != a.shape[0]
        d = m.scaling * b @ a - imp.scalings[m.name] * b_ref @ a_ref
        want = want + 3.0 * float(c) * (imp.matrices[m.name].double() * d * d).sum()
    want.backward()
    assert rel_err(value, want) <= 1e-5
    for m, a, b in leaves.values():
        assert m.a.grad.shape == (rank, m.a.shape[1]) and float(m.a.grad.abs().sum()) > 0
        assert rel_err(m.a.grad, a.grad) <= 1e-5 and rel_err(m.b.grad, b.grad) <= 1e-5
    assert reg.a_ref[0].shape[0] == max(rank, 4), "the reference factors padded once, when the adapter's rank is higher"


def test_ambiguous_anchor_is_an_error():
    model = tiny_lora_model(seed=34)
    imp = _record(model)
    _drift(model)
    with pytest.raises(ValueError, match="anchor='reference'"):
        hlora.Regularizer(model, imp)
    assert hlora.Regularizer(model, imp, anchor="reference").anchor == "reference"
    no_refs = hlora.Importance(imp.matrices, {}, {}, imp.meta)
    with pytest.raises(ValueError, match="no reference factors"):
        hlora.Regularizer(model, no_refs, anchor="reference")


def test_a_regularizer_follows_its_model_to_another_dtype():
    """Built, then the model changes under it (HLoRATrainer's regularizer is built before the
    Trainer places the model): the reference factors follow the factors' dtype (and Ω their device,
    tests/test_hf.py on CUDA)."""
    model = tiny_lora_model(seed=36)
    imp = _record(model)
    _drift(model)
    reg = hlora.Regularizer(model, imp, anchor="reference")
    model.to(torch.float64)
    value = reg.penalty()
    assert value.dtype == torch.float64 and reg.a_ref[0].dtype == torch.float64
    fresh = hlora.Regularizer(model, imp, anchor="reference").penalty()
    assert float(value.detach()) > 0 and rel_err(value.detach(), fresh.detach()) < 1e-12


def test_rslora_scaling_is_respected():
    model = tiny_lora_model(seed=35, rslora=True)
    imp = _record(model)
    mats = find_adapted(model)
    assert mats[0].scaling == pytest.approx(8 / 4**0.5)
    _drift(model)
    reg = hlora.Regularizer(model, imp, phi=1.0, anchor="reference")
    want = sum(float(c) * reference.importance_penalty(
        imp.matrices[m.name].double(), m.a.detach().double(), m.b.detach().double(),
        imp.references[m.name][0].double(), imp.references[m.name][1].double(), scaling=m.scaling)
        for m, c in zip(mats, reg.coefficients))
    assert rel_err(reg.penalty(), want) <= 1e-5


def test_bfloat16_omega_storage_halves_bytes_and_stays_close():
    model = tiny_lora_model(seed=33)
    imp = _record(model)
    full = hlora.Regularizer(model, imp, phi=3.0)
    half = hlora.Regularizer(model, imp, phi=3.0, omega_dtype=torch.bfloat16)
    assert all(o.dtype == torch.bfloat16 for o in half.omegas)
    assert sum(o.nbytes for o in half.omegas) * 2 == sum(o.nbytes for o in full.omegas)
    assert torch.equal(full.coefficients, half.coefficients), "coefficients come from the recorded Ω"
    _drift(model)
    # bfloat16 keeps 8 bits of mantissa: each Ω entry within 2^-9 relative, so P within ~0.4 %.
    assert rel_err(half.penalty().detach(), full.penalty().detach()) <= 4e-3
    with pytest.raises(TypeError, match="omega_dtype"):
        hlora.Regularizer(model, imp, omega_dtype=torch.int8)
    # float16 ends at 65504; Ω with a small ξ goes far beyond: refused, not turned into inf.
    name = imp.names[0]
    big = replace(imp, matrices={**imp.matrices, name: imp.matrices[name] * 0 + 1e6})
    with pytest.raises(ValueError, match=f"{name}: Ω reaches 1e\\+06, beyond the range of float16"):
        hlora.Regularizer(model, big, omega_dtype=torch.float16, anchor="reference")
    assert hlora.Regularizer(model, big, omega_dtype=torch.bfloat16, anchor="reference").omegas[0].isfinite().all()


def test_options_are_checked_with_errors_naming_them():
    model = tiny_lora_model(seed=60)
    imp = _record(model, steps=2)
    for kwargs, error, message in (
            (dict(phi=-1.0), ValueError, "phi must be a finite number >= 0"),
            (dict(phi=float("nan")), ValueError, "phi must be a finite number >= 0"),
            (dict(phi=True), TypeError, "phi must be a number, got bool"),  # was φ = 1
            (dict(phi="1e3"), TypeError, "phi must be a number, got str"),
            (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
            (dict(temperature=float("inf")), ValueError, "temperature must be a finite number > 0"),
            (dict(temperature="mean"), ValueError, 'temperature must be "auto" or a positive number'),
            (dict(layer_weighting="soft"), ValueError, "layer_weighting must be"),
            (dict(anchor="start"), ValueError, "anchor must be one of"),
            (dict(omega_dtype="bfloat16"), TypeError, "omega_dtype must be one of")):
        with pytest.raises(error, match=message):
            hlora.Regularizer(model, imp, **kwargs)
    with pytest.raises(TypeError, match="importance must be an hlora.Importance .* got dict"):
        hlora.Regularizer(model, dict(imp.matrices))  # was an AttributeError from inside
    # NumPy scalars and one-element tensors are numbers, as in hlora.ops.
    reg = hlora.Regularizer(model, imp, phi=np.float32(10.0), temperature=torch.tensor(2.0))
    assert (reg.phi, reg.temperature) == (10.0, 2.0)
