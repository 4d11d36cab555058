"""Choosing φ (HLoRA) and λ (EWC-LoRA) on the validation split, before any seeded test run
(``scripts/select_hyperparameters.py``; ``hlora experiment --selection`` reads its output).

Rule: among the values whose validation accuracy is within 1 point of LoRA(ν+μ)'s (φ = 0), take
the one with the lowest general perplexity (held-out text); the same rule for λ against LoRA(μ).
The sweep resumes like the grid: every finished training is kept in ``<out>.partial/``.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

from hlora import _checks as check
from hlora.experiments import experiment, plots

PHIS = (1e2, 1e3, 1e4, 1e5)
LAMS = (1e2, 1e4, 1e6)
#: The validation accuracy a candidate may lose against its reference method.
ACCURACY_SLACK = 0.01


def pick(candidates: List[Dict], reference_acc: float, key: str) -> float:
    """The lowest-perplexity candidate among those within ``ACCURACY_SLACK`` of the reference's
    accuracy (among all if none is). A diverged run (perplexity NaN or inf) is never chosen."""
    ran = [c for c in candidates if experiment.finite(c["ppl"])]
    if not ran:
        raise ValueError(f"every {key} candidate diverged (general perplexity NaN or inf): {candidates}")
    ok = [c for c in ran if c["acc"] >= reference_acc - ACCURACY_SLACK] or ran
    return min(ok, key=lambda c: c["ppl"])[key]


def _weights(values: Sequence[float], name: str) -> List[float]:
    """A non-empty list of candidate penalty weights (finite, ≥ 0)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"{name} must be a non-empty list of penalty weights, got {values!r}")
    return [check.non_negative(v, f"{name}[{i}]") for i, v in enumerate(values)]


def _at(method: str, weight: float) -> str:
    """The result name of ``method`` at one candidate weight (exact: two candidates never share it)."""
    return f"{method} at {weight!r}"


def select(out: str, domain: str = "medical", seed: int = 1000, phis: Sequence[float] = PHIS,
           lams: Sequence[float] = LAMS, budget: experiment.Budget = experiment.DEMO,
           model_name: Optional[str] = None, progress_bars: bool = True,
           log: Callable[[str], None] = print) -> Dict:
    """The sweep on ``domain``'s validation split; writes ``out`` (JSON, atomically) and the φ sweep's
    plot beside it, and returns what ``out`` holds."""
    # Checked before the model loads (as Comparison checks the domain): a bad candidate list would
    # otherwise fail after the sweep.
    phis, lams = _weights(phis, "phis"), _weights(lams, "lams")
    progress = experiment.Progress(out, budget, model_name, domain, seed)
    cmp = experiment.Comparison(domain, budget, seed=seed, model_name=model_name, progress=progress_bars, log=log)
    cmp.test_items = cmp.val_items[: budget.eval_items]  # everything below is scored on validation data
    progress.resume(cmp, log)
    progress.phase(cmp, experiment.NU, cmp.run_nu)
    for method in ("LoRA(nu+mu)", "LoRA(mu)"):
        progress.phase(cmp, method, lambda: cmp.run_method(method))  # noqa: B023 (called at once)
    for phi in phis:
        progress.phase(cmp, _at("HLoRA", phi), lambda: cmp.run_method("HLoRA", phi=phi))  # noqa: B023
    if any(_at("EWC-LoRA", lam) not in cmp.results for lam in lams):
        progress.ewc_fisher(cmp)
    for lam in lams:
        progress.phase(cmp, _at("EWC-LoRA", lam), lambda: cmp.run_method("EWC-LoRA", lam=lam))  # noqa: B023
    results = cmp.results
    reference = {m: {"ppl": results[m].ppl, "acc": results[m].acc} for m in ("LoRA(nu+mu)", "LoRA(mu)")}
    phi_rows = [{"phi": phi, "ppl": results[_at("HLoRA", phi)].ppl, "acc": results[_at("HLoRA", phi)].acc}
                for phi in phis]
    lam_rows = [{"lam": lam, "ppl": results[_at("EWC-LoRA", lam)].ppl, "acc": results[_at("EWC-LoRA", lam)].acc}
                for lam in lams]
    selection = {"domain": domain, "seed": seed, "budget": budget, "model": model_name, "reference": reference,
                 "phi_sweep": phi_rows, "lam_sweep": lam_rows,
                 "phi": pick(phi_rows, reference["LoRA(nu+mu)"]["acc"], "phi"),
                 "lam": pick(lam_rows, reference["LoRA(mu)"]["acc"], "lam")}
    plots.phi_sweep(phi_rows, os.path.join(os.path.dirname(out), "phi_sweep_validation.png"),
                    baseline=reference["LoRA(nu+mu)"])
    experiment.save_json(out, selection)  # what `hlora experiment --selection` reads
    progress.remove()
    return selection
