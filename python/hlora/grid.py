"""The multi-seed grid (``hlora experiment``): domains × seeds × methods, every (domain, seed) run
saved atomically as it completes and the seed in progress phase by phase (``SeedProgress``), so the
grid resumes where it stopped, across sessions. The
summary gives means ± sd, paired t-tests where methods share a seed's ν run, Welch t-tests (Fig. 3)
and violin plots."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
from typing import Dict, List, Optional, Sequence

import hlora
from hlora import _io, experiment, plots, stats
from hlora._io import write_text_atomic


def _read_json(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)


def run_path(out: str, domain: str, seed: int) -> str:
    return os.path.join(out, domain, f"seed{seed}.json")


def _settings(budget: Dict, model_name: Optional[str]) -> Dict:
    """What a finished run must share with the grid it is summarized in: its budget (as saved,
    JSON-normalized) but the thread count, which changes only the speed, and the model."""
    settings = {k: v for k, v in json.loads(json.dumps(budget, default=list)).items() if k != "threads"}
    return {**settings, "model": model_name}


def _check_finished_run(path: str, budget: experiment.Budget, model_name: Optional[str]) -> None:
    """A run kept from an earlier session must have been made like the ones this grid adds, or
    the summary would set results of two budgets side by side without a word."""
    saved = _read_json(path)
    if "budget" not in saved:  # written by hand or by an hlora before runs recorded theirs
        return
    was = _settings(saved["budget"], saved.get("model"))
    now = _settings(dataclasses.asdict(budget), model_name)
    differ = [f"{k} {was.get(k)!r} → {now.get(k)!r}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    if differ:
        raise ValueError(f"{path} was run with other settings ({'; '.join(differ)}): give another --out, or "
                         "remove that file to run its seed again")


def run_grid(out: str, domains: Sequence[str], seeds: Sequence[int], budget: experiment.Budget,
             model_name: Optional[str] = None, log=print) -> None:
    for domain, n_seeds in zip(domains, seeds):
        os.makedirs(os.path.join(out, domain), exist_ok=True)
        for seed in range(n_seeds):
            path = run_path(out, domain, seed)
            if os.path.isfile(path):
                _check_finished_run(path, budget, model_name)
                log(f"{domain} seed {seed}: done earlier ({path})")
                continue
            progress = SeedProgress(path, budget, model_name)  # its settings checked before the model loads
            log(f"{domain} seed {seed}: running — {budget.describe()}")
            cmp = experiment.Comparison(domain, budget, seed=seed, model_name=model_name, log=log)
            progress.resume(cmp, log)
            if "base" not in cmp.results:
                earlier = run_path(out, domain, 0)
                if seed > 0 and os.path.isfile(earlier):  # the base model does not depend on the seed
                    base = _read_json(earlier)["results"]["base"]
                    cmp.results["base"] = experiment.Result("base", base["ppl"], base["acc"], base["acc_norm"], 0.0)
                else:
                    cmp.run_base()
                progress.save(cmp)
            if "after ν" not in cmp.results:
                cmp.run_nu()
                cmp.measure_recording_overhead(steps=2)
                progress.save_nu(cmp)
                progress.save(cmp)
            for method in experiment.METHODS:
                if method not in cmp.results:
                    cmp.run_method(method)
                    progress.save(cmp)
            experiment.save_json(path, {"domain": domain, "seed": seed, "budget": budget, "model": model_name,
                                        "results": _results(cmp), "costs": cmp.costs})
            progress.remove()
            summarize(out)


def _results(cmp: experiment.Comparison) -> Dict[str, Dict[str, float]]:
    return {k: {"ppl": r.ppl, "acc": r.acc, "acc_norm": r.acc_norm, "seconds": r.seconds}
            for k, r in cmp.results.items()}


class SeedProgress:
    """A (domain, seed) run in progress, kept beside its result file (``seedN.json.partial/``) so a
    crash loses only the phase it was in: the results so far and, once the ν phase is done, the ν
    adapter and its importance, which every method starts from. Removed when the seed's file is
    written."""

    NU_FORMAT = "hlora-nu-adapter"

    def __init__(self, path: str, budget: experiment.Budget, model_name: Optional[str]) -> None:
        self.folder = path + ".partial"
        self.budget, self.model_name = budget, model_name
        if os.path.isfile(self._file("progress.json")):
            _check_finished_run(self._file("progress.json"), budget, model_name)

    def _file(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def resume(self, cmp: experiment.Comparison, log=print) -> None:
        """Puts what an interrupted run of this seed finished into ``cmp``."""
        state = self._file("progress.json")
        if not os.path.isfile(state):
            return
        saved = _read_json(state)
        for name, r in saved["results"].items():
            cmp.results[name] = experiment.Result(name, r["ppl"], r["acc"], r["acc_norm"], r["seconds"])
        cmp.costs.update(saved["costs"])
        if "after ν" in cmp.results:
            tensors, meta = _io.load_checked(self._file("nu_adapter.safetensors"), self.NU_FORMAT)
            cmp.nu_state = {n: (tensors[f"a/{n}"], tensors[f"b/{n}"]) for n in json.loads(meta["names"])}
            cmp.importance = hlora.Importance.load(self._file("importance.safetensors"))
        log(f"  resumed from {self.folder}: {', '.join(cmp.results)} done earlier")

    def save_nu(self, cmp: experiment.Comparison) -> None:
        """The ν adapter and importance, before the progress that says the ν phase is done."""
        os.makedirs(self.folder, exist_ok=True)
        tensors = {f"{k}/{n}": t for n, (a, b) in cmp.nu_state.items() for k, t in (("a", a), ("b", b))}
        _io.save_atomic(self._file("nu_adapter.safetensors"), tensors,
                        {"format": self.NU_FORMAT, "names": json.dumps(list(cmp.nu_state))})
        cmp.importance.save(self._file("importance.safetensors"))

    def save(self, cmp: experiment.Comparison) -> None:
        os.makedirs(self.folder, exist_ok=True)
        experiment.save_json(self._file("progress.json"), {"budget": self.budget, "model": self.model_name,
                                                           "results": _results(cmp), "costs": cmp.costs})

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def load_runs(out: str) -> Dict[str, List[Dict]]:
    runs: Dict[str, List[Dict]] = {}
    if not os.path.isdir(out):
        return runs
    for domain in sorted(os.listdir(out)):
        folder = os.path.join(out, domain)
        if os.path.isdir(folder):
            files = sorted(f for f in os.listdir(folder) if f.startswith("seed") and f.endswith(".json"))
            runs[domain] = [_read_json(os.path.join(folder, f)) for f in files]
    return runs


def _fmt(values: List[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(out: str) -> str:
    """summary.md (and violin PNGs) from every finished run."""
    lines = []
    for domain, runs in load_runs(out).items():
        if not runs:
            continue
        methods = list(runs[0]["results"])
        rise = {m: [r["results"][m]["ppl"] - r["results"]["after ν"]["ppl"] for r in runs] for m in methods}
        acc = {m: [r["results"][m]["acc"] for r in runs] for m in methods}
        ppl = {m: [r["results"][m]["ppl"] for r in runs] for m in methods}
        lines += [f"### {domain} — {len(runs)} seed(s)", "",
                  "| method | general PPL | PPL rise vs ν | domain acc | p (rise, paired vs HLoRA) |",
                  "|---|---:|---:|---:|---:|"]
        tests = {}
        for m in methods:
            p = ""
            if m not in ("HLoRA", "base", "after ν") and len(runs) >= 2:
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
            compared = [m for m in methods if m not in ("base", "after ν")]
            welch = {m: stats.welch(rise[m], rise["HLoRA"])[1] for m in compared if m != "HLoRA"}
            plots.violins({m: rise[m] for m in compared}, os.path.join(out, f"{domain}_ppl_rise.png"),
                          "general PPL rise over the ν model", welch)
            plots.violins({m: acc[m] for m in compared}, os.path.join(out, f"{domain}_accuracy.png"),
                          "domain accuracy")
        lines.append("")
    text = "\n".join(lines)
    write_text_atomic(os.path.join(out, "summary.md"), text)
    return text
