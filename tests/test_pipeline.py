"""The experiment commands end to end on the real model at toy budgets (slow): demo, record →
finetune → evaluate, and the resumable grid's summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hlora
from hlora._io import read_json
from hlora.experiments import experiment, grid, models


def _cli(*args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "hlora.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_demo_quick_writes_results_and_plots(tmp_path):
    out = _cli("demo", "--quick", "--out", str(tmp_path), "--sweep", "100")
    assert "Demo-budget run" in out and "DEMO BUDGET" in out
    results = json.load(open(tmp_path / "results.json"))
    assert set(results["results"]) == {"base", "after ν", *experiment.METHODS}
    assert results["model"] is None and results["budget"]["eval_items"] == 8  # what it was run with
    for r in results["results"].values():
        assert r["ppl"] > 1 and 0 <= r["acc"] <= 1
    assert results["costs"]["ewc_fisher_bytes"] > 0 and results["costs"]["hlora_importance_bytes"] > 0
    assert results["costs"]["nu_step_s"] > 0 and results["costs"]["hlora_recording_overhead_s"] >= 0
    cost_line = out.split("importance cost")[1].split("\n")[0]
    assert "× the recording overhead" in cost_line or "below the timing noise" in cost_line
    for name in ("loss_curves.png", "importance_heatmap.png", "phi_sweep.png"):
        assert (tmp_path / name).stat().st_size > 1000


@pytest.mark.slow
def test_an_interrupted_demo_resumes_with_its_loss_histories(tmp_path, monkeypatch, capsys):
    from hlora import cli

    argv = ["demo", "--quick", "--out", str(tmp_path), "--sweep", "100", "1000"]
    real_run_method = experiment.Comparison.run_method
    ran = []

    def crash_at(crash_phi):
        def run_method(self, method, phi=None):
            if method == "HLoRA" and phi == crash_phi:
                raise KeyboardInterrupt
            ran.append((method, phi))
            return real_run_method(self, method, phi)
        return run_method

    # Killed at HLoRA, after the methods before it; then killed again in the φ sweep, at its second φ.
    monkeypatch.setattr(experiment.Comparison, "run_method", crash_at(None))
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    assert not (tmp_path / "results.json").exists() and (tmp_path / "results.json.partial").is_dir()
    monkeypatch.setattr(experiment.Comparison, "run_nu", lambda self: pytest.fail("the ν phase ran again"))
    monkeypatch.setattr(experiment.Comparison, "run_method", crash_at(1000.0))
    ran.clear()
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    assert ("HLoRA", 100.0) in ran and ("LoRA(nu+mu)", None) not in ran, "the methods done were kept"
    monkeypatch.setattr(experiment.Comparison, "run_method", crash_at("never"))
    ran.clear()
    assert cli.main(argv) == 0
    assert "resumed from" in capsys.readouterr().out
    assert ran == [("HLoRA", 1000.0)], "only the φ in progress ran again"
    saved = json.load(open(tmp_path / "results.json"))
    results = saved["results"]
    assert set(results) == {"base", "after ν", *experiment.METHODS}, "the sweep's runs are not the methods'"
    assert [row["phi"] for row in saved["phi_sweep_validation"]] == [100.0, 1000.0]
    # The loss curves of the methods finished before the crash came back with them.
    assert all(len(results[m]["history"]) == 2 for m in experiment.METHODS)
    assert (tmp_path / "phi_sweep.png").stat().st_size > 1000
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000 and not (tmp_path / "results.json.partial").exists()


@pytest.mark.slow
def test_record_finetune_evaluate_commands(tmp_path):
    _cli("record", "--out", str(tmp_path / "nu"), "--steps", "2", "--batch", "2", "--seq-len", "32")
    assert (tmp_path / "nu" / "importance.safetensors").is_file()
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"question": f"What is {i} plus {i}?", "options": [str(2 * i), "7", "x"],
                                           "answer": 0}) for i in range(6)))
    out = _cli("finetune", "--out", str(tmp_path / "mu"), "--adapter", str(tmp_path / "nu" / "adapter"),
               "--importance", str(tmp_path / "nu" / "importance.safetensors"), "--mcq", str(items),
               "--steps", "2", "--batch", "2", "--phi", "100")
    assert "penalty" in out and (tmp_path / "mu" / "adapter" / "adapter_config.json").is_file()
    # The adapters are saved through a temporary folder that takes their place: none is left.
    assert sorted(os.listdir(tmp_path / "nu")) == ["adapter", "importance.safetensors"]
    assert sorted(os.listdir(tmp_path / "mu")) == ["adapter", "history.json"]
    _cli("finetune", "--out", str(tmp_path / "rs"), "--mcq", str(items), "--steps", "1", "--batch", "2",
         "--r", "4", "--alpha", "8", "--rslora")  # a fresh adapter, rank-stabilized
    config = json.loads((tmp_path / "rs" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, True)
    text = tmp_path / "general.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = _cli("evaluate", "--adapter", str(tmp_path / "mu" / "adapter"), "--text", str(text), "--mcq", str(items),
               "--seq-len", "32")
    assert "general perplexity" in out and "over 6 items" in out


@pytest.mark.slow
def test_an_interrupted_record_command_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    from hlora import cli

    def argv(out):
        return ["record", "--out", str(tmp_path / out), "--steps", "3", "--batch", "1", "--seq-len", "32",
                "--checkpoint-every", "1"]

    assert cli.main(argv("whole")) == 0
    real_batches = experiment.general_batches

    def killed_after_two(*args, **kwargs):
        for i, batch in enumerate(real_batches(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(experiment, "general_batches", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv("resumed"))
    assert os.listdir(tmp_path / "resumed") == ["resume.pt"]
    with pytest.raises(SystemExit):  # another --lr is another run
        cli.main(argv("resumed") + ["--lr", "1e-3"])
    assert "resume.pt holds a run interrupted with other settings (lr 0.0008 → 0.001)" in capsys.readouterr().err
    monkeypatch.setattr(experiment, "general_batches", real_batches)
    assert cli.main(argv("resumed")) == 0
    assert "resume.pt: 2 of 3 steps done earlier" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "resumed")) == ["adapter", "importance.safetensors"]
    whole = hlora.Importance.load(str(tmp_path / "whole" / "importance.safetensors"))
    resumed = hlora.Importance.load(str(tmp_path / "resumed" / "importance.safetensors"))
    assert resumed.meta["steps"] == 3
    # (Bit for bit: --seed fixes the adapter's initialization too — it did not, before these checkpoints.)
    for name, om in whole.matrices.items():
        assert torch.equal(resumed.matrices[name], om), name
        assert all(torch.equal(x, y) for x, y in zip(resumed.references[name], whole.references[name])), name


def test_a_budget_that_cannot_run_is_refused_when_made():
    # eval_items=0 used to fail with a ZeroDivisionError after the whole ν and μ training.
    for kwargs, error, match in [({"eval_items": 0}, ValueError, "eval_items must be >= 1"),
                                 ({"seq_len": 1}, ValueError, "seq_len must be >= 2"),
                                 ({"nu_steps": 2.5}, TypeError, "nu_steps must be an integer"),
                                 ({"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
                                 ({"phi": -1.0}, ValueError, "phi must be a finite number >= 0"),
                                 ({"xi": "1e-3"}, TypeError, "xi must be a number"),
                                 ({"targets": "q_proj"}, TypeError, "targets must be a non-empty tuple"),
                                 ({"targets": ()}, TypeError, "targets must be a non-empty tuple")]:
        with pytest.raises(error, match=match):
            experiment.Budget(**kwargs)
    budget = experiment.Budget(phi=0, targets=["q_proj"], alpha=16)
    assert budget.phi == 0.0 and budget.targets == ("q_proj",) and budget.alpha == 16


def test_cost_ratio_never_divides_by_an_overhead_lost_in_the_noise():
    """The recording overhead is a difference of two timed runs; measured at 0 s, a ratio to it
    printed "92587936005× the recording overhead" once."""
    assert experiment.versus_recording(60.0, 1.0) == "60× the recording overhead"
    assert experiment.versus_recording(92.6, 0.0) == "HLoRA's recording overhead itself below the timing noise"


def test_grid_summary_from_saved_runs(tmp_path):
    methods = ["base", "after ν", *experiment.METHODS]
    for seed, shift in enumerate([0.0, 0.5, 1.0]):
        results = {m: {"ppl": 40 + (0 if m in ("base", "after ν", "HLoRA") else 10) + shift + i * 0.01,
                       "acc": 0.4 + shift / 10, "acc_norm": 0.4, "seconds": 1.0} for i, m in enumerate(methods)}
        costs = {"hlora_recording_overhead_s": 1.0, "hlora_nu_phase_s": 50.0, "hlora_importance_bytes": 4e6,
                 "ewc_fisher_s": 60.0, "ewc_fisher_bytes": 4e6}
        os.makedirs(tmp_path / "medical", exist_ok=True)
        experiment.save_json(grid.run_path(str(tmp_path), "medical", seed),
                             {"domain": "medical", "seed": seed, "results": results, "costs": costs,
                              "budget": experiment.Budget(eval_items=7, threads=1 + seed), "model": None})
    text = grid.summarize(str(tmp_path))
    assert "### medical — 3 seed(s)" in text and "| HLoRA |" in text
    assert "60× the recording overhead" in text
    # The summary says what it summarizes (the thread count may differ between seeds).
    assert "Settings: ν: 30 steps" in text and "7 test items; model SmolLM2-135M-Instruct (the default)." in text
    assert (tmp_path / "medical_ppl_rise.png").stat().st_size > 1000
    assert (tmp_path / "summary.md").read_text() == text
    # A seed of another experiment copied beside them is refused by name, not averaged in.
    mixed = read_json(grid.run_path(str(tmp_path), "medical", 2))
    mixed["budget"]["eval_items"] = 100
    experiment.save_json(grid.run_path(str(tmp_path), "medical", 10), mixed)
    with pytest.raises(ValueError, match=r"seed10.json was run with other settings than .*seed0.json "
                                         r"\(eval_items 7 → 100\): the medical summary would mix two experiments"):
        grid.summarize(str(tmp_path))
    assert (tmp_path / "summary.md").read_text() == text  # the last good summary stays


def test_a_comparison_checks_its_domain_budget_and_seed_before_the_model_loads(monkeypatch):
    from hlora.experiments import models

    def load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(models, "load", load)
    for kwargs, error, match in [({"domain": "legal"}, ValueError, "domain must be one of"),
                                 ({"budget": {"nu_steps": 2}}, TypeError,
                                  "budget must be an hlora.experiments.experiment.Budget"),
                                 ({"seed": 1.5}, TypeError, "seed must be an integer")]:
        with pytest.raises(error, match=match):
            experiment.Comparison(**kwargs)


def test_a_grid_that_does_not_pair_domains_with_seed_counts_is_refused_before_it_runs(tmp_path):
    for domains, seeds, error, match in [(["medical", "science"], [3], ValueError, "must pair up"),
                                         ("medical", [1], ValueError, "must pair up"),
                                         (["legal"], [1], ValueError, "domains must be among"),
                                         (["medical"], [0], ValueError, "seeds for medical must be >= 1"),
                                         (["medical"], [2.0], TypeError, "seeds for medical must be an integer")]:
        with pytest.raises(error, match=match):
            grid.run_grid(str(tmp_path), domains, seeds, experiment.Budget())
    assert not any(tmp_path.iterdir())


def test_grid_refuses_to_resume_beside_runs_of_other_settings(tmp_path):
    """A seed kept from an earlier session under another budget or model would be summarized beside
    the new ones as if comparable; only the thread count may differ."""
    budget = experiment.Budget(eval_items=50)
    path = grid.run_path(str(tmp_path), "medical", 0)
    os.makedirs(os.path.dirname(path))
    experiment.save_json(path, {"domain": "medical", "seed": 0, "budget": budget, "model": None, "results": {}})
    logged = []
    grid.run_grid(str(tmp_path), ["medical"], [1], experiment.Budget(eval_items=50, threads=7), log=logged.append)
    assert logged == [f"medical seed 0: done earlier ({path})"]  # nothing run, nothing refused
    with pytest.raises(ValueError, match=r"seed0.json was run with other settings \(eval_items 50 → 100\)"):
        grid.run_grid(str(tmp_path), ["medical"], [1], experiment.Budget())
    with pytest.raises(ValueError, match=r"model None → 'other/model'"):
        grid.run_grid(str(tmp_path), ["medical"], [1], budget, model_name="other/model")
    # Naming the default model, or one folder by two paths, is the same model.
    logged.clear()
    grid.run_grid(str(tmp_path), ["medical"], [1], budget, model_name="smollm2", log=logged.append)
    assert logged == [f"medical seed 0: done earlier ({path})"]
    # The same for a seed interrupted mid-way (its progress is kept beside its result file).
    os.remove(path)
    os.makedirs(path + ".partial")
    experiment.save_json(path + ".partial/progress.json", {"domain": "medical", "seed": 0, "budget": budget,
                                                          "model": None, "results": {}, "costs": {}})
    with pytest.raises(ValueError, match=r"progress.json was run with other settings \(eval_items 50 → 100\)"):
        grid.run_grid(str(tmp_path), ["medical"], [1], experiment.Budget())
    # A demo's progress names its domain and seed (its --out does not).
    with pytest.raises(ValueError, match=r"other settings \(domain 'medical' → 'science'; seed 0 → 3\)"):
        experiment.Progress(path, budget, None, "science", 3)


def test_each_model_has_one_identity_however_it_is_named(tmp_path, monkeypatch):
    """What resumed runs compare: every spelling of the default is the default, a folder is its
    real path, a hub name is itself."""
    monkeypatch.setenv("HLORA_CACHE", str(tmp_path / "cache"))
    cached = Path(models._default_folder())
    assert cached.parent == tmp_path / "cache"
    cached.mkdir(parents=True)
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    default_spellings = [None, "", "smollm2", str(cached), os.path.join("cache", cached.name)]
    assert [models.identity(m) for m in default_spellings] == [None] * 5
    assert models.identity("mine") == models.identity("./mine/") == os.path.realpath(tmp_path / "mine")
    assert models.identity("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    # Summaries and notes print one name for all of them.
    assert {models.label(m) for m in default_spellings} == {"SmolLM2-135M-Instruct (the default)"}
    assert models.label("mine") == "mine"


@pytest.mark.slow
def test_a_grid_seed_interrupted_mid_way_resumes_from_its_last_phase(tmp_path, monkeypatch):
    """A crash in the fourth method keeps base, ν and the three methods before it: the resumed run
    trains only what was left, and its results are those of a run that never stopped."""
    budget = experiment.Budget(nu_steps=2, nu_batch=2, seq_len=64, mu_steps=2, mu_batch=2, ppl_blocks=2,
                               eval_items=4)
    whole = tmp_path / "whole"
    grid.run_grid(str(whole), ["physical"], [1], budget, log=lambda s: None)
    want = json.load(open(grid.run_path(str(whole), "physical", 0)))["results"]

    out, ran = str(tmp_path / "resumed"), []
    real_run_method = experiment.Comparison.run_method

    def crash_at_ewc(self, method, phi=None):
        if method == "EWC-LoRA":
            raise KeyboardInterrupt  # the process dies here
        ran.append(method)
        return real_run_method(self, method, phi)

    monkeypatch.setattr(experiment.Comparison, "run_method", crash_at_ewc)
    with pytest.raises(KeyboardInterrupt):
        grid.run_grid(out, ["physical"], [1], budget, log=lambda s: None)
    path = grid.run_path(out, "physical", 0)
    assert not os.path.exists(path) and ran == list(experiment.METHODS[:3])
    assert set(json.load(open(path + ".partial/progress.json"))["results"]) == {"base", "after ν", *ran}
    assert os.path.isfile(path + ".partial/ewc_fisher.safetensors")  # computed before EWC-LoRA's μ phase died

    ran.clear()
    monkeypatch.setattr(experiment.Comparison, "run_method",
                        lambda self, method, phi=None: ran.append(method) or real_run_method(self, method, phi))
    monkeypatch.setattr(experiment.Comparison, "run_nu", lambda self: pytest.fail("the ν phase ran again"))
    monkeypatch.setattr(experiment.Comparison, "run_base", lambda self: pytest.fail("the base ran again"))
    monkeypatch.setattr(experiment, "empirical_fisher", lambda *a, **k: pytest.fail("the Fisher was computed again"))
    logged = []
    grid.run_grid(out, ["physical"], [1], budget, log=logged.append)
    assert ran == list(experiment.METHODS[3:])
    assert any("resumed from" in line and "LoRA(mu)" in line for line in logged)
    got = json.load(open(path))["results"]
    assert json.load(open(path))["costs"]["ewc_sequences"] == 4  # the kept Fisher's cost is reported
    for method, r in want.items():
        assert {k: r[k] for k in ("ppl", "acc", "acc_norm")} == {k: got[method][k] for k in ("ppl", "acc", "acc_norm")}
    assert not os.path.exists(path + ".partial")
