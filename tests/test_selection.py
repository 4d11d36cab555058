"""φ and λ chosen on the validation split (scripts/select_hyperparameters.py): the rule, and a sweep
that resumes after a crash with the choice of a sweep that never stopped."""

from __future__ import annotations

import json
import math
import os

import pytest

from hlora.experiments import experiment, models, selection


def test_the_rule_takes_the_lowest_perplexity_within_a_point_and_never_a_diverged_run():
    rows = [{"phi": 1e5, "ppl": math.nan, "acc": 0.9},  # diverged: first, so a plain min() would keep it
            {"phi": 1e2, "ppl": 50.0, "acc": 0.60},
            {"phi": 1e3, "ppl": 45.0, "acc": 0.595},  # within 1 point of 0.60: chosen
            {"phi": 1e4, "ppl": 40.0, "acc": 0.55}]   # lowest perplexity, but 5 points down
    assert selection.pick(rows, 0.60, "phi") == 1e3
    assert selection.pick(rows, 0.99, "phi") == 1e4  # none within a point: the lowest perplexity
    with pytest.raises(ValueError, match="every lam candidate diverged"):
        selection.pick([{"lam": 1.0, "ppl": math.inf, "acc": 0.5}], 0.5, "lam")


def test_a_sweep_that_cannot_choose_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(models, "load", no_model)
    out = str(tmp_path / "selection.json")
    for kwargs, error, match in [({"phis": ()}, TypeError, "phis must be a non-empty list"),
                                 ({"lams": 1e3}, TypeError, "lams must be a non-empty list"),
                                 ({"phis": [1e3, -1.0]}, ValueError, r"phis\[1\] must be a finite number >= 0"),
                                 ({"lams": [math.nan]}, ValueError, r"lams\[0\] must be a finite number >= 0"),
                                 ({"domain": "legal"}, ValueError, "domain must be one of")]:
        with pytest.raises(error, match=match):
            selection.select(out, **kwargs)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_with_the_choice_of_an_uninterrupted_one(tmp_path, monkeypatch):
    budget = experiment.Budget(nu_steps=2, nu_batch=2, seq_len=64, mu_steps=2, mu_batch=2, ppl_blocks=2,
                               eval_items=4)
    sweep = dict(domain="physical", seed=1000, phis=(1e2, 1e4), lams=(1e2, 1e6), budget=budget,
                 progress_bars=False, log=lambda s: None)
    want = selection.select(str(tmp_path / "whole" / "selection.json"), **sweep)

    out, ran = str(tmp_path / "resumed" / "selection.json"), []
    real_run_method, real_run_nu = experiment.Comparison.run_method, experiment.Comparison.run_nu

    crash = True

    def crash_at_the_last_lam(self, method, phi=None, lam=None):
        if lam == 1e6 and crash:
            raise KeyboardInterrupt  # the process dies here
        ran.append((method, phi, lam))
        return real_run_method(self, method, phi, lam)

    def count_nu(self):
        ran.append("ν")
        return real_run_nu(self)

    os.makedirs(os.path.dirname(out))
    monkeypatch.setattr(experiment.Comparison, "run_method", crash_at_the_last_lam)
    monkeypatch.setattr(experiment.Comparison, "run_nu", count_nu)
    with pytest.raises(KeyboardInterrupt):
        selection.select(out, **sweep)
    assert not os.path.exists(out) and len(ran) == 1 + 2 + 2 + 1  # ν, two references, two φ, the first λ
    ran.clear()
    crash = False
    monkeypatch.setattr(experiment, "empirical_fisher", lambda *a, **k: pytest.fail("the Fisher was computed again"))
    got = selection.select(out, **sweep)
    assert ran == [("EWC-LoRA", None, 1e6)]  # nothing but the last λ ran again (not ν, not the Fisher)
    assert got == want  # every perplexity and accuracy to the bit
    saved = json.load(open(out))
    assert saved["phi"] in (1e2, 1e4) and saved["lam"] in (1e2, 1e6)
    assert saved["budget"]["lam"] == budget.lam  # the budget as made, not the last λ tried
    assert not os.path.exists(out + ".partial") and os.path.isfile(tmp_path / "resumed" / "phi_sweep_validation.png")
