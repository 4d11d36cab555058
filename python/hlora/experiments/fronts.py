"""Forgetting–accuracy fronts (``hlora fronts``): HLoRA against the baselines practitioners already
use, each swept over its one knob, on the same seeds, ν run, data order and budgets as the grid.

Two passes, both resumable run by run (``experiment.Progress``: a crash loses the run in progress):

1. **validation** (medical, seed 1000, validation items): every knob's candidate grid; its result
   fixes, before any test run, the knob values of each test front (``frontier.window``: from "no
   effect" to "no learning", at least five) and each method's selected strength (the grid's rule:
   lowest perplexity within a point of the unregularized method's accuracy).
2. **test** (``<domain>/seed<k>.json``): those values, the single-point methods and the WiSE
   interpolations, scored on the test items and the general-knowledge test set.

``fronts_summary.summarize`` rebuilds the tables and plots from whatever runs are finished.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import hlora
from hlora import _io
from hlora._io import read_json
from hlora.experiments import data, experiment, frontier, models, selection
from hlora.experiments.baselines.corda import corda_model
from hlora.experiments.baselines.distill import KLToReference
from hlora.experiments.baselines.replay import replay_batches
from hlora.experiments.baselines.uniform import uniform_importance
from hlora.experiments.baselines.wise import interpolated

NU = experiment.NU


@dataclass(frozen=True)
class Knob:
    """A method's one knob and the grid the validation pass tries, weakest to strongest."""

    name: str
    candidates: tuple
    start: str  # the adapter its μ phase starts from: "nu" (the ν adapter) or "fresh"


WEIGHTS = (1e1, 1e2, 1e3, 1e4, 1e5, 1e6)
#: The swept methods. "L2" is HLoRA with Ω ≡ its global mean (the element-wise ablation); "+layer"
#: keeps HLoRA's layer coefficients. "Replay" mixes general tokens (share p) into each μ step;
#: "KL" adds β·KL to the ν model on general batches; "HLoRA+Replay" is HLoRA with replay at
#: ``COMBINED_REPLAY``, its φ on HLoRA's values.
KNOBS: Dict[str, Knob] = {
    "HLoRA": Knob("phi", WEIGHTS, "nu"),
    "HLoRA-layer": Knob("phi", WEIGHTS, "nu"),
    "L2": Knob("phi", WEIGHTS, "nu"),
    "L2+layer": Knob("phi", WEIGHTS, "nu"),
    "EWC-LoRA": Knob("lam", (1e2, 1e3, 1e4, 1e5, 1e6, 1e7), "fresh"),
    "Replay": Knob("p", (0.01, 0.05, 0.1, 0.25, 0.5, 0.75), "nu"),
    "KL": Knob("beta", (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0), "nu"),
    "HLoRA+Replay": Knob("phi", WEIGHTS, "nu"),
}
COMBINED_REPLAY = 0.1
#: Methods with one point each (no knob).
SINGLES = ("LoRA(mu)", "LoRA(nu+mu)", "rsLoRA(nu+mu)", "CorDA")
#: WiSE-FT: the end adapter of a trained method interpolated toward its start (m = 1: the method
#: itself, m = 0: the start — the ν adapter, or the base model for LoRA(μ)). Evaluation only.
WISE = {"WiSE LoRA(nu+mu)": "LoRA(nu+mu)", "WiSE LoRA(mu)": "LoRA(mu)", "WiSE HLoRA": "HLoRA"}
WISE_M = (0.2, 0.4, 0.6, 0.8)
VALIDATION_SEED = 1000
#: The test seeds the issue asks for, per domain.
SEEDS = {"medical": 3, "science": 2, "physical": 2}
END_FORMAT = "hlora-fronts-end-adapter"


def point(method: str, value: float) -> str:
    """A front point's result name, e.g. ``"HLoRA phi=1000.0"`` (exact: two values never share it)."""
    knob = KNOBS[method].name if method in KNOBS else "m"
    return f"{method} {knob}={value!r}"


# ---------------------------------------------------------------- one run

def train_point(cmp: experiment.Comparison, method: str, value: Optional[float] = None) -> experiment.Result:
    """``method``'s μ phase at knob ``value`` and its evaluation (a single-point method: ``value`` None)."""
    b = cmp.budget
    if method in ("LoRA(mu)", "LoRA(nu+mu)", "rsLoRA(nu+mu)"):
        return cmp.run_method(method)
    if method in ("HLoRA", "HLoRA-layer"):
        return cmp.run_method(method, phi=value)
    if method == "EWC-LoRA":
        return cmp.run_method(method, lam=value)
    if method in ("L2", "L2+layer"):
        flat = uniform_importance(cmp.importance, layer_coefficients=method == "L2+layer")
        return cmp._mu(cmp.model, method, cmp.nu_state, lambda: hlora.Regularizer(
            cmp.model, flat, phi=value, layer_weighting="uniform", anchor="reference"))
    general = cmp.general_blocks
    if method in ("Replay", "HLoRA+Replay"):
        share = value if method == "Replay" else COMBINED_REPLAY
        batches = replay_batches(cmp.domain_batches(), general, share, cmp.tokenizer.pad_token_id, cmp.seed + 1)
        factory = None if method == "Replay" else (lambda: hlora.Regularizer(
            cmp.model, cmp.importance, phi=value, anchor="reference"))
        return cmp._mu(cmp.model, method, cmp.nu_state, factory, batches=batches)
    if method == "KL":
        # The general batches the ν phase trained on, in another order; the reference copy is made
        # inside _mu, after the ν adapter is loaded.
        kl_batches = experiment.general_batches(general, b.nu_batch, b.mu_steps, cmp.seed + 2)
        return cmp._mu(cmp.model, method, cmp.nu_state, lambda: KLToReference(cmp.model, kl_batches, value))
    if method == "CorDA":
        base, _ = models.load(cmp.model_name, device=cmp.device)
        calibration = general[: b.nu_steps * b.nu_batch]  # the ν phase's amount of general text
        model, prep_s = corda_model(base, calibration, r=b.r, alpha=b.alpha, targets=b.targets)
        result = cmp._mu(model, method, experiment.lora_state(model))
        result.extra["corda_preprocess_s"] = prep_s
        return result
    raise ValueError(f"method must be one of {(*SINGLES, *KNOBS)}, got {method!r}")


class Run:
    """One (domain, seed) of either pass, resumable: ``experiment.Progress`` keeps the ν phase and
    every finished point in ``<path>.partial/``; the end adapters WiSE interpolates are kept there too."""

    def __init__(self, path: str, cmp: experiment.Comparison, progress: experiment.Progress,
                 log: Callable[[str], None]) -> None:
        self.path, self.cmp, self.progress, self.log = path, cmp, progress, log
        #: How each kept end adapter was trained: (method, knob value), to train it again where a
        #: committed progress file came without it.
        self.end_recipes: Dict[str, tuple] = {}

    def start(self) -> None:
        self.progress.resume(self.cmp, self.log)
        self.progress.phase(self.cmp, "base", self.cmp.run_base)
        self.progress.phase(self.cmp, NU, self.cmp.run_nu)

    def train(self, name: str, method: str, value: Optional[float] = None, keep_end: bool = False) -> None:
        if keep_end:
            self.end_recipes[name] = (method, value)

        def work() -> experiment.Result:
            result = train_point(self.cmp, method, value)
            if keep_end:  # before the phase is marked done: WiSE reads it
                self._save_end(name)
            return result

        self.progress.phase(self.cmp, name, work)

    def wise(self, label: str, source: str, m: float) -> None:
        cmp = self.cmp

        def work() -> experiment.Result:
            self._ensure_end(source)
            end = self._load_end(source)
            start = None if source == "LoRA(mu)" else cmp.nu_state  # LoRA(μ) started from the base model
            with interpolated(cmp.model, start, end, m):
                return cmp.evaluate(cmp.model, point(label, m))

        self.progress.phase(cmp, point(label, m), work)

    def _save_end(self, name: str) -> None:
        state = experiment.lora_state(self.cmp.model)
        os.makedirs(self.progress.folder, exist_ok=True)
        _io.save_atomic(self._end_file(name), experiment.state_tensors(state),
                        {"format": END_FORMAT, "run": name, "names": json.dumps(list(state))})

    def _ensure_end(self, name: str) -> None:
        """The end adapter of the finished point ``name``, trained again if its file is gone (the
        progress was committed without it); the retrained point must reproduce the recorded one."""
        if os.path.isfile(self._end_file(name)):
            return
        method, value = self.end_recipes[name]
        self.log(f"  the end adapter of {name} is not kept here: {name} is trained again")
        recorded = dict(self.cmp.results)
        rerun = train_point(self.cmp, method, value)
        self.cmp.results = recorded  # the recorded numbers stay; the rerun only rebuilds the adapter
        experiment.check_reproduced(recorded[name], rerun, self.progress.folder)
        self._save_end(name)

    def _end_file(self, name: str) -> str:
        return os.path.join(self.progress.folder, _safe(name) + ".end.safetensors")

    def _load_end(self, name: str) -> Dict[str, tuple]:
        tensors, meta = _io.load_checked(self._end_file(name), END_FORMAT)
        return experiment.tensors_state(tensors, json.loads(meta["names"]))

    def finish(self, extra: Dict) -> Dict:
        """The run's file (atomically), its progress folder removed; returns what the file holds."""
        payload = {**self.progress.run_id, "budget": self.cmp.budget, "model": self.cmp.model_name,
                   "results": {name: {"ppl": r.ppl, "acc": r.acc, "acc_norm": r.acc_norm, "seconds": r.seconds,
                                      "extra": r.extra} for name, r in self.cmp.results.items()},
                   "costs": self.cmp.costs, **extra}
        experiment.save_json(self.path, payload)
        self.progress.remove()
        return read_json(self.path)  # as a resumed study reads it


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


def _open(path: str, domain: str, seed: int, split: str, budget: experiment.Budget, model_name: Optional[str],
          knowledge_items: Optional[int], progress_bars: bool, log: Callable[[str], None]) -> Run:
    progress = experiment.Progress(path, budget, model_name, domain, seed)  # settings checked before the model loads
    cmp = experiment.Comparison(domain, budget, seed=seed, model_name=model_name, progress=progress_bars, log=log)
    if split == "val":
        cmp.test_items = cmp.val_items[: budget.eval_items]
    cmp.knowledge_items = data.general_knowledge(split)[:knowledge_items]
    return Run(path, cmp, progress, log)


# ---------------------------------------------------------------- the two passes

def validation_path(out: str) -> str:
    return os.path.join(out, "validation.json")


def validate(out: str, budget: experiment.Budget, model_name: Optional[str] = None,
             knobs: Optional[Dict[str, Knob]] = None, knowledge_items: Optional[int] = None,
             progress_bars: bool = True, log: Callable[[str], None] = print) -> Dict:
    """The validation pass (medical, ``VALIDATION_SEED``): each knob's candidates, then the test values
    and selected strengths it fixes. Kept in ``validation.json``; a finished one is read, not rerun."""
    knobs = KNOBS if knobs is None else knobs
    path = validation_path(out)
    if os.path.isfile(path):
        experiment.check_settings(path, budget, model_name)
        return read_json(path)
    os.makedirs(out, exist_ok=True)
    run = _open(path, "medical", VALIDATION_SEED, "val", budget, model_name, knowledge_items, progress_bars, log)
    run.start()
    for method in ("LoRA(nu+mu)", "LoRA(mu)"):
        run.train(method, method)
    for method, knob in knobs.items():
        if method == "HLoRA+Replay":  # on HLoRA's φ values: replay at a fixed share changes no φ scale
            continue
        if method == "EWC-LoRA" and any(point(method, v) not in run.cmp.results for v in knob.candidates):
            run.progress.ewc_fisher(run.cmp)
        for value in knob.candidates:
            run.train(point(method, value), method, value)
    return run.finish(choose(run.cmp.results, knobs))


def choose(results: Dict[str, experiment.Result], knobs: Dict[str, Knob]) -> Dict:
    """What the validation points fix: each method's test values (``frontier.window`` against the
    unregularized method it starts like: LoRA(ν+μ), or LoRA(μ) for EWC) and its selected strength."""
    nu = results[NU]
    values, selected = {}, {}
    for method, knob in knobs.items():
        source = "HLoRA" if method == "HLoRA+Replay" else method
        reference = results["LoRA(mu)" if knob.start == "fresh" else "LoRA(nu+mu)"]
        rows = [{"knob": v, "rise": results[point(source, v)].ppl - nu.ppl,
                 "gain": results[point(source, v)].acc - nu.acc, "acc": results[point(source, v)].acc,
                 "ppl": results[point(source, v)].ppl} for v in knob.candidates]
        keep = frontier.window(rows, reference.ppl - nu.ppl, reference.acc - nu.acc)
        values[method] = [knob.candidates[i] for i in keep]
        selected[method] = selection.pick(rows, reference.acc, "knob")
    return {"values": values, "selected": selected}


def test_path(out: str, domain: str, seed: int) -> str:
    return os.path.join(out, domain, f"seed{seed}.json")


def run_test(out: str, domain: str, seed: int, chosen: Dict, budget: experiment.Budget,
             model_name: Optional[str] = None, methods: Optional[Sequence[str]] = None,
             knowledge_items: Optional[int] = None, progress_bars: bool = True,
             log: Callable[[str], None] = print) -> Dict:
    """One (domain, seed) of the test pass at the values ``chosen`` (``validate``'s result); a finished
    one is read, an interrupted one resumes."""
    path = test_path(out, domain, seed)
    if os.path.isfile(path):
        experiment.check_settings(path, budget, model_name, domain=domain, seed=seed)
        return read_json(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    run = _open(path, domain, seed, "test", budget, model_name, knowledge_items, progress_bars, log)
    run.start()
    wanted = list(SINGLES) + list(chosen["values"]) if methods is None else list(methods)
    # WiSE interpolates LoRA(μ), LoRA(ν+μ) and HLoRA at its selected φ: their end adapters are kept.
    ends = {"LoRA(mu)": "LoRA(mu)", "LoRA(nu+mu)": "LoRA(nu+mu)"}
    phi = chosen["selected"].get("HLoRA")
    if phi is not None:
        ends["HLoRA"] = point("HLoRA", phi) if phi in chosen["values"].get("HLoRA", []) else "HLoRA (WiSE end)"
    for method in SINGLES:
        if method in wanted:
            run.train(method, method, keep_end=method in ends)
    for method, values in chosen["values"].items():
        if method not in wanted:
            continue
        if method == "EWC-LoRA" and any(point(method, v) not in run.cmp.results for v in values):
            run.progress.ewc_fisher(run.cmp)
        for value in values:
            run.train(point(method, value), method, value, keep_end=point(method, value) == ends.get(method))
    if "HLoRA" in wanted and ends.get("HLoRA") == "HLoRA (WiSE end)":
        run.train("HLoRA (WiSE end)", "HLoRA", phi, keep_end=True)
    for label, source in WISE.items():
        if source in wanted and source in ends:
            for m in WISE_M:
                run.wise(label, ends[source], m)
    return run.finish({"values": chosen["values"], "selected": chosen["selected"]})


def study(out: str, budget: experiment.Budget, domains: Sequence[str] = tuple(SEEDS),
          seeds: Optional[Sequence[int]] = None, model_name: Optional[str] = None,
          knowledge_items: Optional[int] = None, log: Callable[[str], None] = print) -> None:
    """The validation pass, then every (domain, seed) of the test pass, the summary rebuilt after each."""
    from hlora.experiments import fronts_summary

    seeds = [SEEDS[d] for d in domains] if seeds is None else list(seeds)
    if len(seeds) != len(domains):
        raise ValueError(f"seeds must give one count per domain: {seeds!r} for {list(domains)!r}")
    for domain in domains:
        if domain not in data.DOMAINS:
            raise ValueError(f"domains must be among {data.DOMAINS}, got {domain!r}")
    chosen = validate(out, budget, model_name, knowledge_items=knowledge_items, log=log)
    for domain, count in zip(domains, seeds):
        for seed in range(count):
            log(f"fronts: {domain} seed {seed}")
            run_test(out, domain, seed, chosen, budget, model_name, knowledge_items=knowledge_items, log=log)
            fronts_summary.summarize(out)

