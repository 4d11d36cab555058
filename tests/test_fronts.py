"""The fronts study (issue 34): each new baseline moves training the intended way (tiny model), the
front arithmetic gives known answers on synthetic points, and the study itself runs, resumes and
summarizes on the real model at a toy budget (slow)."""

from __future__ import annotations

import math
import os

import pytest
import torch

import hlora
from hlora.adapters import find_adapted
from hlora.experiments import experiment, frontier, fronts, fronts_summary
from hlora.experiments.baselines.distill import KLToReference
from hlora.experiments.baselines.replay import replay_batches
from hlora.experiments.baselines.uniform import uniform_importance
from hlora.experiments.baselines.wise import interpolated

from tiny import SEQ, VOCAB, TokenData, tiny_lora_model


def _perturbed(model, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in find_adapted(model):
            m.a.add_(scale * torch.randn(m.a.shape, generator=g))
            m.b.add_(scale * torch.randn(m.b.shape, generator=g))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_wise_at_0_is_the_start_adapter_at_1_the_end_one_and_the_base_is_restored():
    model = tiny_lora_model()
    ids = TokenData(4).seqs[:2]
    _perturbed(model, 1)
    start = experiment.lora_state(model)
    at_start = _logits(model, ids)
    _perturbed(model, 2)
    end = experiment.lora_state(model)
    at_end = _logits(model, ids)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with interpolated(model, start, end, 0.0):
        torch.testing.assert_close(_logits(model, ids), at_start, rtol=1e-5, atol=1e-5)
    with interpolated(model, start, end, 1.0):
        torch.testing.assert_close(_logits(model, ids), at_end, rtol=1e-5, atol=1e-5)
    with interpolated(model, start, end, 0.5):
        halfway = _logits(model, ids)
    assert not torch.allclose(halfway, at_start) and not torch.allclose(halfway, at_end)
    for n, p in model.named_parameters():  # exactly as before, and the adapter back on
        if n in weights:
            assert torch.equal(p, weights[n]), n
    torch.testing.assert_close(_logits(model, ids), at_end)
    with pytest.raises(ValueError, match="m must be in"):
        with interpolated(model, start, end, 1.5):
            pass


def test_wise_from_the_base_model_scales_the_adapter_delta():
    """start None (LoRA(μ)): m = 0 is the base model."""
    model = tiny_lora_model()
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    _perturbed(model, 3)
    with model.disable_adapter():
        base = _logits(model, ids)
    with interpolated(model, None, experiment.lora_state(model), 0.0):
        torch.testing.assert_close(_logits(model, ids), base)


def test_replay_batches_hold_the_stated_share_of_general_tokens():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(5, 50, (10, 32), generator=g)
    domain = []
    for lengths in ((7, 12, 5), (20, 3, 9)):
        width = max(lengths)
        mask = torch.zeros(len(lengths), width, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        ids = torch.randint(60, 90, (len(lengths), width), generator=g) * mask
        domain.append({"input_ids": ids, "labels": torch.where(mask.bool(), ids, -100), "attention_mask": mask})
    for p in (0.1, 0.25, 0.5, 0.75, 0.9):
        for before, after in zip(domain, replay_batches(iter(domain), blocks, p, pad_id=0, seed=1)):
            t, rows = int(before["attention_mask"].sum()), before["input_ids"].shape[0]
            mask = after["attention_mask"][rows:]
            general = int(mask.sum())
            want = round(p / (1 - p) * t)
            # Every general token is kept but a last lone one (a one-token row predicts nothing).
            assert general == want - (want % 32 == 1)
            assert abs(general / (general + t) - p) < 1.5 / t
            # Rows no longer than the general blocks (32 tokens), each filled from its start.
            assert mask.shape[0] == -(-general // 32) and bool((mask.sum(1) <= 32).all())
            assert torch.equal(mask, (torch.arange(mask.shape[1]) < mask.sum(1, keepdim=True)).long())
            tokens = after["input_ids"][rows:][mask.bool()]
            assert bool(((tokens >= 5) & (tokens < 50)).all())  # drawn from the general blocks
            assert torch.equal(after["labels"][rows:][mask.bool()], tokens)
            assert bool((after["labels"][rows:][~mask.bool()] == -100).all())
            assert torch.equal(after["input_ids"][:rows, :before["input_ids"].shape[1]], before["input_ids"])
    assert [b["input_ids"].shape for b in replay_batches(iter(domain), blocks, 0.0, 0, 1)] == \
        [b["input_ids"].shape for b in domain]
    with pytest.raises(ValueError, match="fraction must be in"):
        next(replay_batches(iter(domain), blocks, 1.0, 0, 1))


def _recorded_importance(model):
    data = TokenData(16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    recorder = hlora.ImportanceRecorder(model, opt)
    for i in range(3):
        ids = data.seqs[i * 4:(i + 1) * 4]
        model(input_ids=ids, labels=ids).loss.backward()
        recorder.before_step()
        opt.step()
        recorder.after_step()
        opt.zero_grad()
    return recorder.finalize()


def test_uniform_importance_is_one_constant_with_the_recorded_total():
    model = tiny_lora_model()
    importance = _recorded_importance(model)
    total = sum(float(om.double().sum()) for om in importance.matrices.values())
    flat = uniform_importance(importance, layer_coefficients=False)
    values = torch.cat([om.flatten() for om in flat.matrices.values()])
    assert bool((values == values[0]).all()) and float(values[0]) > 0
    assert math.isclose(float(values.double().sum()), total, rel_tol=1e-5)
    layered = uniform_importance(importance, layer_coefficients=True)
    constants = [float(om.flatten()[0]) for om in layered.matrices.values()]
    assert all(bool((om == om.flatten()[0]).all()) for om in layered.matrices.values())
    assert len(set(constants)) > 1  # each matrix its own constant: L·c_l times the mean
    assert layered.references.keys() == importance.references.keys()
    # Under the uniform weighting, that penalty is φ·(1/L)·Σ_l mean·L·c_l·‖D_l‖²: HLoRA's layer
    # weighting over a constant Ω.
    _perturbed(model, 5)
    regularizer = hlora.Regularizer(model, layered, phi=1.0, layer_weighting="uniform", anchor="reference")
    got = float(regularizer.penalty().detach())
    mean = total / values.numel()
    norms = torch.tensor(list(importance.norms().values()), dtype=torch.float64)
    c = hlora.ops.layer_coefficients(norms, mode="softmax", temperature=float(norms.mean()))
    expected = 0.0
    for (name, _), c_l in zip(layered.matrices.items(), c):
        m = next(x for x in find_adapted(model) if x.name == name)
        a_ref, b_ref = layered.references[name]
        d = m.scaling * (m.b.double() @ m.a.double() - b_ref.double() @ a_ref.double())
        expected += float(c_l) * mean * float((d * d).sum().detach())
    assert math.isclose(got, expected, rel_tol=1e-4)


def test_kl_to_the_reference_is_zero_at_it_and_grows_away_from_it():
    model = tiny_lora_model()
    _perturbed(model, 7)
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    batches = iter([{"input_ids": ids}] * 3)
    kl = KLToReference(model, batches, beta=2.0)
    assert float(kl.penalty().detach()) == pytest.approx(0.0, abs=1e-6)
    _perturbed(model, 8, scale=0.3)
    value = kl.penalty()
    assert float(value.detach()) > 1e-4
    value.backward()
    grads = [m.a.grad for m in find_adapted(model)]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in kl.reference.parameters())  # the reference stays frozen
    assert float(kl.divergence(ids).detach()) * 2.0 == pytest.approx(float(kl.penalty().detach()), rel=1e-5)
    with pytest.raises(ValueError, match="beta"):
        KLToReference(model, batches, beta=-1.0)


# ---------------------------------------------------------------- front arithmetic

def test_window_runs_from_no_effect_to_no_learning_with_at_least_five_values():
    rise = [100, 99, 95, 60, 30, 10, 5, 2]
    gain = [10, 10, 10, 9, 6, 2, 0, 0]
    rows = [{"rise": r, "gain": g} for r, g in zip(rise, gain)]
    # First effect at index 3 (60 < 90): start at 2; first no learning (≤ 2.5) at 5: end there.
    assert frontier.window(rows, reference_rise=100, reference_gain=10, minimum=3) == [2, 3, 4, 5]
    assert frontier.window(rows, reference_rise=100, reference_gain=10) == [2, 3, 4, 5, 6]  # widened, stronger first
    assert frontier.window(rows[:5], 100, 10, minimum=7) == [0, 1, 2, 3, 4]  # the grid is smaller
    nan = [{"rise": 100, "gain": 10}, {"rise": math.nan, "gain": math.nan}, {"rise": 1, "gain": 0}]
    assert frontier.window(nan, 100, 10, minimum=2) == [0, 1]  # a diverged run has no learning
    assert frontier.window(rows, 100, -1.0)[-1] == 7  # no reference gain: to the strongest


def test_front_at_matched_accuracy_is_its_least_forgetting_at_or_above_the_target():
    front = [{"acc": 0.60, "rise": 50.0}, {"acc": 0.50, "rise": 10.0}, {"acc": 0.40, "rise": 2.0}]
    assert frontier.at_accuracy(front, 0.55) == pytest.approx(30.0)
    assert frontier.at_accuracy(front, 0.50) == pytest.approx(10.0)
    assert frontier.at_accuracy(front, 0.45) == pytest.approx(6.0)
    assert math.isnan(frontier.at_accuracy(front, 0.65))  # never reached
    zigzag = [{"acc": 0.4, "rise": 1.0}, {"acc": 0.6, "rise": 3.0}, {"acc": 0.4, "rise": 9.0}]
    assert frontier.at_accuracy(zigzag, 0.5) == pytest.approx(2.0)  # the lower of two crossings
    above = [{"acc": 0.70, "rise": 20.0}, {"acc": 0.65, "rise": 3.0}, {"acc": 0.62, "rise": 5.0}]
    assert frontier.at_accuracy(above, 0.6) == pytest.approx(3.0)  # every point above: its least forgetting
    overshoot = [{"acc": 0.5, "rise": 30.0}, {"acc": 0.7, "rise": 4.0}]
    assert frontier.at_accuracy(overshoot, 0.6) == pytest.approx(4.0)  # a point above beats the crossing (17)
    assert frontier.matched_target(0.40, 0.60) == pytest.approx(0.58)


def test_dominance_shares_on_known_fronts():
    a = [{"acc": 0.5, "rise": 10.0}, {"acc": 0.6, "rise": 20.0}]
    b = [{"acc": 0.5, "rise": 5.0}, {"acc": 0.7, "rise": 30.0}]
    assert frontier.dominated_share(a, b) == 0.5  # (0.5, 5) dominates (0.5, 10) only
    assert frontier.dominated_share(b, a) == 0.0
    assert frontier.dominated_share(a, a) == 0.0  # a point never dominates its equal
    assert math.isnan(frontier.dominated_share([], b))


def test_mean_front_and_verdicts():
    fronts_ = [[{"knob": 1, "acc": 0.5, "rise": 10.0}], [{"knob": 1, "acc": 0.7, "rise": 20.0}]]
    (row,) = frontier.mean_front(fronts_, keys=("acc", "rise"))
    assert row["acc"] == pytest.approx(0.6) and row["rise"] == pytest.approx(15.0)
    assert row["rise_sd"] == pytest.approx(math.sqrt(50.0))
    with pytest.raises(ValueError, match="same knob values"):
        frontier.mean_front([[{"acc": 1, "rise": 1}], []])
    assert frontier.verdict(1.0, 2.0, 0.01) == "ahead" and frontier.verdict(3.0, 2.0, 0.01) == "behind"
    assert frontier.verdict(1.0, 2.0, 0.2) == "tied" and frontier.verdict(1.0, math.nan, None).startswith("ahead")
    # One seed has no test: the reading is reported, no side is called.
    assert frontier.verdict(1.0, 2.0, None).startswith("HLoRA forgets less, untested")
    assert frontier.verdict(3.0, 2.0, None).startswith("HLoRA forgets more, untested")


def _synthetic_run(seed: int, hlora_shift: float) -> dict:
    """A finished test run: HLoRA's front lies `hlora_shift` below L2's at every accuracy."""
    def res(ppl, acc, know=0.7):
        return {"ppl": ppl, "acc": acc, "acc_norm": acc, "seconds": 60.0, "extra": {"knowledge_acc": know}}

    results = {"base": res(40.0, 0.30, 0.80), experiment.NU: res(40.0 + seed, 0.40, 0.75),
               "LoRA(nu+mu)": res(100.0 + seed, 0.60), "LoRA(mu)": res(120.0, 0.62)}
    values = {"HLoRA": [1.0, 10.0, 100.0], "L2": [1.0, 10.0, 100.0]}
    for method, shift in (("HLoRA", hlora_shift), ("L2", 0.0)):
        for phi, (rise, acc) in zip(values[method], ((50.0, 0.60), (20.0, 0.55), (5.0, 0.45))):
            results[fronts.point(method, phi)] = res(40.0 + seed + rise - shift, acc)
    return {"domain": "medical", "seed": seed, "results": results, "values": values,
            "selected": {"HLoRA": 10.0}, "costs": {}}


def test_summary_of_synthetic_runs_reports_the_known_matched_values(tmp_path):
    for seed in range(3):
        os.makedirs(tmp_path / "medical", exist_ok=True)
        experiment.save_json(str(tmp_path / "medical" / f"seed{seed}.json"), _synthetic_run(seed, 4.0 + seed))
    experiment.save_json(fronts.validation_path(str(tmp_path)),
                         {"values": {"HLoRA": [1.0, 10.0, 100.0], "L2": [1.0, 10.0, 100.0]},
                          "selected": {"HLoRA": 10.0, "L2": 10.0}, "seed": 1000})
    table = fronts_summary.matched(fronts_summary.load(str(tmp_path))[1]["medical"], "rise")
    # Target 0.58 = 0.40 + 0.9·0.20: 0.4 of the way from (0.60, 50) to (0.55, 20) → L2 rise 38.
    assert table["L2"] == pytest.approx([38.0, 38.0, 38.0])
    assert table["HLoRA"] == pytest.approx([38.0 - 4.0, 38.0 - 5.0, 38.0 - 6.0])
    text = fronts_summary.summarize(str(tmp_path))
    assert "| L2 | 38.00 ± 0.00 |" in text and "| HLoRA | 33.00 ± 1.00 |" in text
    l2_line = next(line for line in text.splitlines() if line.startswith("| L2 | 38.00"))
    assert "| LoRA(nu+mu) | 0.600 ± 0.000 | 60.00 ± 0.00 |" in text  # single points: their own row
    assert l2_line.endswith("| ahead |")  # HLoRA 4-6 below, consistently: significant
    assert "| L2 | 0% | 100% |" in text  # HLoRA's shifted front dominates all of L2's
    assert (tmp_path / "medical_fronts.png").stat().st_size > 10_000
    assert "**10**" in text  # the selected strength


def test_summary_shows_every_validation_point_and_its_matched_reading(tmp_path):
    def res(ppl, acc, known):
        return {"ppl": ppl, "acc": acc, "acc_norm": acc, "seconds": 60.0, "extra": {"knowledge_acc": known}}

    results = {experiment.NU: res(40.0, 0.40, 0.90), "LoRA(nu+mu)": res(100.0, 0.60, 0.70),
               "LoRA(mu)": res(120.0, 0.62, 0.60)}
    for phi, (rise, acc, known) in zip((1e1, 1e2, 1e3), ((50.0, 0.60, 0.80), (20.0, 0.55, 0.85), (5.0, 0.45, 0.90))):
        results[fronts.point("HLoRA", phi)] = res(40.0 + rise, acc, known)
    experiment.save_json(fronts.validation_path(str(tmp_path)),
                         {"seed": 1000, "results": results, "values": {"HLoRA": [1e2, 1e3]},
                          "selected": {"HLoRA": 1e2}})
    text = fronts_summary.summarize(str(tmp_path))
    row = next(line for line in text.splitlines() if line.startswith("| HLoRA | (10: "))
    # Matched accuracy 0.58: 0.4 of the way from (0.60, 50, drop 0.10) to (0.55, 20, drop 0.05).
    assert "**100: 0.550 / 20.0 / +0.050**" in row and row.endswith("| 38.0, +0.080 |")
    assert "| LoRA(mu) | 0.620 / 80.0 / +0.300 | 80.0, +0.300 |" in text  # one point, above the target: its own
    assert (tmp_path / "validation_fronts.png").stat().st_size > 10_000


# ---------------------------------------------------------------- the study on the real model (toy budget)

TOY = experiment.Budget(nu_steps=2, nu_batch=2, seq_len=32, mu_steps=2, mu_batch=2, ppl_blocks=2, eval_items=3,
                        threads=2)


@pytest.mark.slow
def test_the_study_validates_runs_and_resumes_on_the_real_model(tmp_path, monkeypatch):
    knobs = {"HLoRA": fronts.Knob("phi", (1e1, 1e8), "nu"), "Replay": fronts.Knob("p", (0.1, 0.5), "nu"),
             "KL": fronts.Knob("beta", (1e-3, 1e3), "nu")}
    out = str(tmp_path)
    chosen = fronts.validate(out, TOY, knobs=knobs, knowledge_items=3, progress_bars=False)
    assert set(chosen["values"]) == set(knobs) and all(len(v) == 2 for v in chosen["values"].values())
    assert chosen["selected"]["HLoRA"] in (1e1, 1e8)
    assert fronts.validate(out, TOY, knobs=knobs, knowledge_items=3) == chosen  # read, not rerun

    real, trained = fronts.train_point, []

    def crash_at(after: int):
        def train_point(cmp, method, value=None):
            if method == "Replay" and trained.count("Replay") == after:
                raise RuntimeError("killed")
            trained.append(method)
            return real(cmp, method, value)
        return train_point

    methods = ["LoRA(mu)", "LoRA(nu+mu)", "HLoRA", "Replay", "KL"]
    partial = fronts.test_path(out, "medical", 0) + ".partial"
    monkeypatch.setattr(fronts, "train_point", crash_at(0))
    with pytest.raises(RuntimeError, match="killed"):
        fronts.run_test(out, "medical", 0, chosen, TOY, methods=methods, knowledge_items=3, progress_bars=False)
    done_before = experiment.read_json(os.path.join(partial, "progress.json"))["results"]
    assert {"LoRA(mu)", "LoRA(nu+mu)", fronts.point("HLoRA", 1e1)} <= set(done_before)
    trained.clear()
    monkeypatch.setattr(fronts, "train_point", crash_at(1))
    with pytest.raises(RuntimeError, match="killed"):
        fronts.run_test(out, "medical", 0, chosen, TOY, methods=methods, knowledge_items=3, progress_bars=False)
    assert trained == ["Replay"]  # resumed after the finished points, then killed again
    # A fresh clone holds the committed progress.json, not the ν adapter, Ω and end adapters beside
    # it: the ν phase and the ends WiSE needs are trained again and reproduce what was recorded.
    for name in os.listdir(partial):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(partial, name))
    trained.clear()
    monkeypatch.setattr(fronts, "train_point", crash_at(-1))
    run = fronts.run_test(out, "medical", 0, chosen, TOY, methods=methods, knowledge_items=3, progress_bars=False)
    assert sorted(trained) == sorted(["Replay", "KL", "KL", "LoRA(mu)", "LoRA(nu+mu)", "HLoRA"])
    results = run["results"]
    for name in ("LoRA(mu)", "LoRA(nu+mu)", fronts.point("HLoRA", 1e1), experiment.NU):
        assert results[name]["ppl"] == done_before[name]["ppl"], name  # recorded, not the rerun's
    for label in ("WiSE LoRA(nu+mu)", "WiSE LoRA(mu)", "WiSE HLoRA"):
        assert all(fronts.point(label, m) in results for m in fronts.WISE_M), label
    assert all(0 <= r["extra"]["knowledge_acc"] <= 1 and r["extra"]["eval_s"] > 0 for r in results.values())
    # φ = 1e8 keeps the adapter at ν: the general perplexity moves far less than without the penalty.
    nu_ppl = results[experiment.NU]["ppl"]
    assert abs(results[fronts.point("HLoRA", 1e8)]["ppl"] - nu_ppl) < abs(results["LoRA(nu+mu)"]["ppl"] - nu_ppl)
    assert not os.path.exists(fronts.test_path(out, "medical", 0) + ".partial")
    text = fronts_summary.summarize(out)
    assert "### medical — 1 seed(s)" in text and os.path.isfile(os.path.join(out, "medical_fronts.png"))


@pytest.mark.slow
def test_corda_builds_a_knowledge_preserved_adapter_on_the_real_model():
    """CorDA-KPM from PEFT on SmolLM2: at initialization the model computes what the base did (the
    adapter holds what was moved out of the base weights), and its factors are trainable."""
    from hlora.experiments import data, models
    from hlora.experiments.baselines.corda import corda_model
    from hlora.experiments.eval import perplexity, token_blocks

    torch.set_num_threads(2)
    base, tokenizer = models.load()
    blocks = token_blocks(tokenizer, data.general_text("train"), 32)[:4]
    held_out = token_blocks(tokenizer, data.general_text("test"), 32, 2)
    before = perplexity(base, held_out)["ppl"]
    model, seconds = corda_model(base, blocks, r=4, alpha=8, targets=("q_proj", "v_proj"))
    assert seconds > 0
    assert perplexity(model, held_out)["ppl"] == pytest.approx(before, rel=1e-3)
    adapted = find_adapted(model)
    assert len(adapted) == 60 and all(m.a.requires_grad and float(m.a.norm()) > 0 for m in adapted)


def test_the_fronts_command_routes_seeds_and_rebuilds_the_summary(monkeypatch, capsys, tmp_path):
    from hlora import cli

    ran = []
    monkeypatch.setattr(fronts, "study", lambda out, budget, domains, seeds, model_name, knowledge_items:
                        ran.append((list(domains), list(seeds), budget.eval_items, knowledge_items)))
    monkeypatch.setattr(fronts_summary, "summarize", lambda out: "summary")
    out = str(tmp_path)
    assert cli.main(["fronts", "--out", out]) == 0
    assert ran.pop() == (["medical", "science", "physical"], [3, 2, 2], 200, None)
    assert cli.main(["fronts", "--out", out, "--domains", "science", "--seeds", "4", "--quick"]) == 0
    assert ran.pop() == (["science"], [4], 4, 4)
    with pytest.raises(SystemExit):
        cli.main(["fronts", "--out", out, "--domains", "medical", "science", "--seeds", "1", "2", "3"])
    assert "--seeds needs one count, or one per domain" in capsys.readouterr().err and not ran
    with pytest.raises(SystemExit):
        cli.main(["fronts", "--summary-only", "--out", str(tmp_path / "missing")])
    assert "no such folder" in capsys.readouterr().err
    assert cli.main(["fronts", "--summary-only", "--out", out]) == 0
    assert capsys.readouterr().out.strip() == "summary"
