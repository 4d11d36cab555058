"""The multi-seed grid (``hlora experiment``): domains × seeds × methods, every (domain, seed) run
saved atomically as it completes and the seed in progress phase by phase (``experiment.Progress``),
so the grid resumes where it stopped, across sessions. The summary gives means ± sd, paired t-tests
where methods share a seed's ν run, Welch t-tests (Fig. 3) and violin plots."""

from __future__ import annotations

import os
import statistics
from dataclasses import fields
from typing import Dict, List, Optional, Sequence, Tuple

from hlora import _checks as check
from hlora._io import read_json, write_text_atomic
from hlora.experiments import data, experiment, models, plots, stats


def run_path(out: str, domain: str, seed: int) -> str:
    return os.path.join(out, domain, f"seed{seed}.json")


def run_grid(out: str, domains: Sequence[str], seeds: Sequence[int], budget: experiment.Budget,
             model_name: Optional[str] = None, log=print) -> None:
    """``seeds[i]`` seeds of ``domains[i]`` (seeds 0, 1, …), each kept in ``run_path`` as it ends."""
    # Checked before any run: zip() would drop the domains past the last seed count without a word.
    if isinstance(domains, str) or len(domains) != len(seeds):
        raise ValueError(f"domains and seeds must pair up, one seed count per domain: got {domains!r} and {seeds!r}")
    for domain, n_seeds in zip(domains, seeds):
        if domain not in data.DOMAINS:
            raise ValueError(f"domains must be among {data.DOMAINS}, got {domain!r}")
        check.count(n_seeds, f"seeds for {domain}")
    for domain, n_seeds in zip(domains, seeds):
        os.makedirs(os.path.join(out, domain), exist_ok=True)
        for seed in range(n_seeds):
            path = run_path(out, domain, seed)
            if os.path.isfile(path):
                experiment.check_settings(path, budget, model_name)
                log(f"{domain} seed {seed}: done earlier ({path})")
                continue
            # An interrupted run of this seed: its settings checked before the model loads.
            progress = experiment.Progress(path, budget, model_name, domain, seed)
            log(f"{domain} seed {seed}: running — {budget.describe()}")
            cmp = experiment.Comparison(domain, budget, seed=seed, model_name=model_name, log=log)
            # (The lambda is called within this iteration: the loop variables it reads are this seed's.)
            progress.run(cmp, lambda: _base(cmp, run_path(out, domain, 0), seed), overhead_steps=2, log=log)  # noqa: B023
            experiment.save_json(path, {"domain": domain, "seed": seed, "budget": budget, "model": model_name,
                                        "results": experiment.results_payload(cmp.results), "costs": cmp.costs})
            progress.remove()
            summarize(out)


def _base(cmp: experiment.Comparison, seed0_path: str, seed: int) -> None:
    """The base model's evaluation: seed 0's when it is done (it does not depend on the seed)."""
    if seed > 0 and os.path.isfile(seed0_path):
        r = read_json(seed0_path)["results"]["base"]
        cmp.results["base"] = experiment.Result("base", r["ppl"], r["acc"], r["acc_norm"], 0.0)
    else:
        cmp.run_base()


def load_runs(out: str) -> Dict[str, List[Tuple[str, Dict]]]:
    """Every finished run under ``out``, as (path, run) pairs per domain, in seed order."""
    runs: Dict[str, List[Tuple[str, Dict]]] = {}
    if not os.path.isdir(out):
        return runs
    for domain in sorted(os.listdir(out)):
        folder = os.path.join(out, domain)
        if os.path.isdir(folder):
            files = sorted((f for f in os.listdir(folder) if f.startswith("seed") and f.endswith(".json")),
                           key=lambda f: (len(f), f))  # seed2 before seed10
            runs[domain] = [(path, read_json(path)) for path in (os.path.join(folder, f) for f in files)]
    return runs


def _settings_of(domain: str, runs: List[Tuple[str, Dict]]) -> str:
    """The one budget and model every run of a domain was made with, as a line for the summary;
    runs of other settings (copied in, or kept from before runs recorded theirs) are refused by
    name — their means would mix two experiments."""
    made = [(path, settings, run) for path, run in runs
            if (settings := experiment.recorded_settings(run)) is not None]
    if not made:
        return ""
    first_path, first, run = made[0]
    for path, settings, _ in made[1:]:
        differ = check.differences(first, settings)
        if differ:
            raise ValueError(f"{path} was run with other settings than {first_path} ({'; '.join(differ)}): "
                             f"the {domain} summary would mix two experiments; move one of them to another --out")
    known = {f.name for f in fields(experiment.Budget)}
    budget = experiment.Budget(**{k: v for k, v in run["budget"].items() if k in known})
    return f"Settings: {budget.describe()}; model {models.label(run.get('model'))}."


def _fmt(values: List[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(out: str) -> str:
    """summary.md (and violin PNGs) from every finished run."""
    lines = []
    for domain, kept in load_runs(out).items():
        if not kept:
            continue
        settings = _settings_of(domain, kept)
        runs = [run for _, run in kept]
        methods = list(runs[0]["results"])
        rise = {m: [r["results"][m]["ppl"] - r["results"][experiment.NU]["ppl"] for r in runs] for m in methods}
        acc = {m: [r["results"][m]["acc"] for r in runs] for m in methods}
        ppl = {m: [r["results"][m]["ppl"] for r in runs] for m in methods}
        lines += [f"### {domain} — {len(runs)} seed(s)", "", *([settings, ""] if settings else []),
                  "| method | general PPL | PPL rise vs ν | domain acc | p (rise, paired vs HLoRA) |",
                  "|---|---:|---:|---:|---:|"]
        tests = {}
        for m in methods:
            p = ""
            if m not in ("HLoRA", "base", experiment.NU) and len(runs) >= 2:
                _, pv = stats.paired(rise[m], rise["HLoRA"])
                tests[m] = pv
                p = f"{pv:.3g}"
            lines.append(f"| {m} | {_fmt(ppl[m])} | {_fmt(rise[m])} | {_fmt(acc[m], 3)} | {p} |")
        costs = [r["costs"] for r in runs if "ewc_fisher_s" in r["costs"]]
        if costs:
            rec = statistics.mean(c["hlora_recording_overhead_s"] for c in costs)
            nu = statistics.mean(c["hlora_nu_phase_s"] for c in costs)
            ewc = statistics.mean(c["ewc_fisher_s"] for c in costs)
            lines += ["", f"Importance cost (mean over seeds): HLoRA recording overhead {rec:.1f} s, whole ν phase "
                          f"{nu:.1f} s, {costs[0]['hlora_importance_bytes'] / 1e6:.1f} MB; EWC Fisher {ewc:.1f} s, "
                          f"{costs[0]['ewc_fisher_bytes'] / 1e6:.1f} MB → {experiment.versus_recording(ewc, rec)}, "
                          f"{ewc / nu:.2f}× the whole ν phase."]
        if len(runs) >= 2:
            compared = [m for m in methods if m not in ("base", experiment.NU)]
            welch = {m: stats.welch(rise[m], rise["HLoRA"])[1] for m in compared if m != "HLoRA"}
            plots.violins({m: rise[m] for m in compared}, os.path.join(out, f"{domain}_ppl_rise.png"),
                          "general PPL rise over the ν model", welch)
            plots.violins({m: acc[m] for m in compared}, os.path.join(out, f"{domain}_accuracy.png"),
                          "domain accuracy")
        lines.append("")
    text = "\n".join(lines)
    write_text_atomic(os.path.join(out, "summary.md"), text)
    return text
