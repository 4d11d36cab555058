"""The paper's comparison on a real model, offline: one general phase ν (recorded once, shared),
then every method's domain phase μ from the same seed, evaluated on general perplexity and domain
accuracy.

Methods (Table 1): base; LoRA(μ) — a fresh adapter on the domain only; LoRA(ν+μ) — the ν adapter
continued on the domain; rsLoRA(ν+μ) — the same with rank-stabilized scaling (its own ν run);
EWC-LoRA — a fresh adapter with λ·Σ F ⊙ (s·B·A)², F the per-sequence Fisher on the ν data;
HLoRA — the ν adapter continued with φ·Σ c_l·P_l; HLoRA − layer — uniform c_l.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from tqdm.auto import tqdm

import hlora
from hlora import _checks as check
from hlora import _io
from hlora._io import read_json, write_json_atomic
from hlora.adapters import find_adapted
from hlora.experiments import data, models
from hlora.experiments import eval as metrics
from hlora.experiments.baselines.ewc import EWCPenalty, Fisher, empirical_fisher, sequences_for_budget
from hlora.experiments.checkpoint import StepCheckpoint

#: The result of the shared general phase (task ν), every ν+μ method's starting point.
NU = "after ν"
METHODS = ("LoRA(mu)", "LoRA(nu+mu)", "rsLoRA(nu+mu)", "EWC-LoRA", "HLoRA", "HLoRA-layer")


@dataclass
class Budget:
    """Everything that sizes a run; printed with every result."""

    nu_steps: int = 30
    nu_batch: int = 4
    seq_len: int = 128
    mu_steps: int = 40
    mu_batch: int = 8
    lr: float = 8e-4
    r: int = 8
    alpha: int = 32
    ppl_blocks: int = 24
    eval_items: int = 100
    xi: float = 1e-3
    phi: float = 1e3
    lam: float = 1e4  # chosen on the validation split (docs/experiments.md); 1e3 barely regularized
    threads: int = 2
    targets: tuple = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        # Checked when made: a budget that cannot run (0 evaluation items, a one-token block)
        # would otherwise fail only after the training it sizes.
        for name in ("nu_steps", "nu_batch", "mu_steps", "mu_batch", "r", "ppl_blocks", "eval_items", "threads"):
            setattr(self, name, check.count(getattr(self, name), name))
        self.seq_len = check.count(self.seq_len, "seq_len", minimum=2)
        self.lr, self.xi = check.positive(self.lr, "lr"), check.positive(self.xi, "xi")
        check.positive(self.alpha, "alpha")  # kept as given (an int in LoraConfig and the saved runs)
        self.phi, self.lam = check.non_negative(self.phi, "phi"), check.non_negative(self.lam, "lam")
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) for t in self.targets):
            raise TypeError(f"targets must be a non-empty tuple of module names, got {self.targets!r}")
        self.targets = tuple(self.targets)

    def describe(self) -> str:
        return (f"ν: {self.nu_steps} steps × {self.nu_batch} × {self.seq_len} tokens; μ: {self.mu_steps} steps × "
                f"{self.mu_batch} items; AdamW lr {self.lr}; LoRA r={self.r} α={self.alpha} on "
                f"{'+'.join(self.targets)}; ξ={self.xi} φ={self.phi:g} λ={self.lam:g}; eval: {self.ppl_blocks} "
                f"held-out blocks, {self.eval_items} test items")


DEMO = Budget()


@dataclass
class Result:
    method: str
    ppl: float
    acc: float
    acc_norm: float
    seconds: float
    history: List[Dict[str, float]] = field(default_factory=list)
    extra: Dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- data

def domain_batches(tokenizer, items: List[data.MCQItem], batch: int, steps: int, seed: int):
    """Question + correct answer, loss on the answer tokens only; a seeded order, same for every method."""
    g = torch.Generator().manual_seed(seed)
    encoded = []
    for item in items:
        p, a = data.training_text(item)
        pi = tokenizer(p, add_special_tokens=False).input_ids
        ai = tokenizer(a, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        encoded.append((pi + ai, [-100] * len(pi) + ai))
    order: List[int] = []
    while len(order) < steps * batch:
        order += torch.randperm(len(encoded), generator=g).tolist()
    pad = tokenizer.pad_token_id
    for s in range(steps):
        chunk = [encoded[i] for i in order[s * batch:(s + 1) * batch]]
        width = max(len(x) for x, _ in chunk)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for j, (x, y) in enumerate(chunk):
            ids[j, :len(x)], labels[j, :len(y)], mask[j, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


def general_batches(blocks: torch.Tensor, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=g)
    for s in range(steps):
        idx = order[(s * batch) % len(blocks):][:batch]
        ids = blocks[idx]
        yield {"input_ids": ids, "labels": ids}


# ---------------------------------------------------------------- training

def lora_state(model) -> Dict[str, tuple]:
    return {m.name: (m.a.detach().clone(), m.b.detach().clone()) for m in find_adapted(model)}


def state_tensors(state: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
    """An adapter state as flat tensors for a file: ``a/<name>`` and ``b/<name>`` per matrix."""
    return {f"{k}/{n}": t for n, (a, b) in state.items() for k, t in (("a", a), ("b", b))}


def tensors_state(tensors: Dict[str, torch.Tensor], names: List[str]) -> Dict[str, tuple]:
    """The adapter state ``state_tensors`` flattened, matrices in the order of ``names``."""
    return {n: (tensors[f"a/{n}"], tensors[f"b/{n}"]) for n in names}


def load_lora_state(model, state: Dict[str, tuple]) -> None:
    with torch.no_grad():
        for m in find_adapted(model):
            m.a.copy_(state[m.name][0])
            m.b.copy_(state[m.name][1])


def train(model, batches, steps: int, lr: float, *, recorder=None, penalty: Optional[Callable] = None,
          desc: str = "train", progress: bool = True, checkpoint: Optional[StepCheckpoint] = None
          ) -> List[Dict[str, float]]:
    """Plain AdamW LoRA training; optional ω recording and a penalty added once per step. With a
    ``checkpoint``, the run resumes from the one kept there (skipping the batches it did) and
    keeps one every ``checkpoint.every`` steps."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=lr)
    if recorder is not None:
        recorder.optimizer = opt
    device = params[0].device
    history: List[Dict[str, float]] = []
    start = 0
    if checkpoint is not None and checkpoint.step:
        start = checkpoint.step
        history = checkpoint.restore(named, opt, recorder)
        batches = itertools.islice(batches, start, None)
    model.train()
    bar = tqdm(batches, total=steps, initial=start, desc=desc, disable=not progress, leave=False)
    for step, batch in enumerate(bar, start):
        batch = {k: v.to(device) for k, v in batch.items()}
        task = model(**batch).loss
        pen = penalty() if penalty is not None else None
        loss = task + pen if pen is not None else task
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recorder is not None:
            recorder.before_step()
        opt.step()
        if recorder is not None:
            recorder.after_step()
        history.append({"step": step + 1, "task_loss": float(task.detach()),
                        "penalty": float(pen.detach()) if pen is not None else 0.0})
        if checkpoint is not None:
            checkpoint.maybe_save(step + 1, steps, named, opt, recorder, history)
    model.eval()
    return history


# ---------------------------------------------------------------- the comparison

class Comparison:
    """One seed, one domain: shares the ν phase and the evaluation sets across methods."""

    def __init__(self, domain: str = "medical", budget: Budget = DEMO, seed: int = 0, model_name: Optional[str] = None,
                 device: Optional[str] = None, progress: bool = True,
                 log: Callable[[str], None] = lambda s: print(s, flush=True)) -> None:
        from peft import LoraConfig, get_peft_model

        if not isinstance(budget, Budget):
            raise TypeError(f"budget must be an hlora.experiments.experiment.Budget, got {type(budget).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):  # a float seed would fail deep in torch
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        # The domain's items first: a bad domain fails before the model loads.
        self.train_items = data.mcq(domain, "train")
        self.test_items = data.mcq(domain, "test")[: budget.eval_items]
        self.val_items = data.mcq(domain, "val")
        torch.set_num_threads(budget.threads)
        self.domain, self.budget, self.seed, self.progress, self.log = domain, budget, seed, progress, log
        self.model_name = model_name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        base, self.tokenizer = models.load(model_name, device=self.device)
        for p in base.parameters():
            p.requires_grad_(False)
        self.general_blocks = metrics.token_blocks(self.tokenizer, data.general_text("train"), budget.seq_len)
        self.ppl_blocks = metrics.token_blocks(self.tokenizer, data.general_text("test"), budget.seq_len,
                                               budget.ppl_blocks)
        self.base = base
        self.results: Dict[str, Result] = {}
        self.costs: Dict[str, float] = {}
        self.fisher: Optional[Fisher] = None
        #: A second measure of forgetting besides perplexity (the fronts study sets it): accuracy on
        #: general-knowledge questions (``data.general_knowledge``), kept as ``extra["knowledge_acc"]``.
        self.knowledge_items: Optional[List[data.MCQItem]] = None

        # rsLoRA gets its own copy of the untouched base (get_peft_model injects layers in place).
        self._rs_base = copy.deepcopy(base)

        def peft(rslora: bool):
            torch.manual_seed(seed)
            cfg = LoraConfig(r=budget.r, lora_alpha=budget.alpha, target_modules=list(budget.targets),
                             lora_dropout=0.0, use_rslora=rslora)
            return get_peft_model(self._rs_base if rslora else base, cfg)

        self.model = peft(False)
        self.fresh = lora_state(self.model)
        self.rs_model = None
        self._peft = peft

    # -- evaluation
    def evaluate(self, model, method: str, seconds: float = 0.0, history=None, **extra) -> Result:
        started = time.perf_counter()
        ppl = metrics.perplexity(model, self.ppl_blocks, progress=self.progress)["ppl"]
        acc = metrics.mcq_accuracy(model, self.tokenizer, self.test_items, progress=self.progress)
        knowledge = ""
        if self.knowledge_items is not None:
            extra["knowledge_acc"] = metrics.mcq_accuracy(model, self.tokenizer, self.knowledge_items,
                                                          progress=self.progress)["acc"]
            extra["eval_s"] = time.perf_counter() - started
            knowledge = f"   knowledge {extra['knowledge_acc']:.3f}"
        res = Result(method, ppl, acc["acc"], acc["acc_norm"], seconds, history or [], dict(extra))
        self.results[method] = res
        self.log(f"  {method:<14} PPL {ppl:7.2f}   acc {acc['acc']:.3f}   acc_norm {acc['acc_norm']:.3f}"
                 f"{knowledge}   ({seconds:.0f} s)")
        return res

    def _nu(self, model, record: bool):
        b = self.budget
        recorder = hlora.ImportanceRecorder(model, xi=b.xi) if record else None
        t0 = time.perf_counter()
        hist = train(model, general_batches(self.general_blocks, b.nu_batch, b.nu_steps, self.seed), b.nu_steps, b.lr,
                     recorder=recorder, desc="ν general", progress=self.progress)
        seconds = time.perf_counter() - t0
        return hist, seconds, recorder.finalize() if recorder else None

    def run_base(self) -> Result:
        with self.model.disable_adapter():
            return self.evaluate(self.model, "base")

    def run_nu(self) -> Result:
        """The shared general phase: LoRA on general text, recording Ω (HLoRA's whole importance cost)."""
        load_lora_state(self.model, self.fresh)
        hist, seconds, self.importance = self._nu(self.model, record=True)
        self.nu_state = lora_state(self.model)
        self.costs.update({"hlora_nu_phase_s": seconds, "hlora_importance_bytes": sum(
            t.numel() * t.element_size() for t in self.importance.matrices.values())})
        return self.evaluate(self.model, NU, seconds, hist)

    def measure_recording_overhead(self, steps: int = 4) -> None:
        """Seconds of a ν-phase step without and with recording, on the same batch: an untimed
        warm-up round, then `steps` rounds alternating the two, medians. The overhead (a small
        fraction of a step) is a difference of two noisy timings; 0 means it was lost in the noise."""
        b = self.budget
        times: Dict[bool, List[float]] = {False: [], True: []}
        for rnd in range(steps + 1):
            for record in (False, True):
                load_lora_state(self.model, self.fresh)
                recorder = hlora.ImportanceRecorder(self.model, xi=b.xi) if record else None
                t0 = time.perf_counter()
                train(self.model, general_batches(self.general_blocks, b.nu_batch, 1, self.seed + 1), 1, b.lr,
                      recorder=recorder, progress=False)
                if rnd > 0:  # round 0 warms caches and allocator up
                    times[record].append(time.perf_counter() - t0)
        plain, recorded = statistics.median(times[False]), statistics.median(times[True])
        self.costs["nu_step_s"] = plain
        self.costs["hlora_recording_overhead_s_per_step"] = max(0.0, recorded - plain)
        self.costs["hlora_recording_overhead_s"] = self.costs["hlora_recording_overhead_s_per_step"] * b.nu_steps

    def domain_batches(self):
        """The μ phase's batches: the same seeded order for every method."""
        b = self.budget
        return domain_batches(self.tokenizer, self.train_items, b.mu_batch, b.mu_steps, self.seed)

    def _mu(self, model, method: str, start: Dict[str, tuple], penalty_factory=None, batches=None) -> Result:
        """``method``'s μ phase from ``start`` (``batches``: other than the domain's, e.g. with replay),
        then its evaluation; the seconds include building the penalty (a KL reference's copy, say)."""
        b = self.budget
        load_lora_state(model, start)
        t0 = time.perf_counter()
        penalty = penalty_factory() if penalty_factory else None
        hist = train(model, self.domain_batches() if batches is None else batches, b.mu_steps, b.lr,
                     penalty=penalty.penalty if penalty else None, desc=f"μ {method}", progress=self.progress)
        return self.evaluate(model, method, time.perf_counter() - t0, hist)

    def ewc_fisher(self) -> Fisher:
        """EWC-LoRA's Fisher on the ν phase's amount of general text, computed once per comparison
        (a resumed one may have it already: ``Progress``)."""
        if self.fisher is None:
            b = self.budget
            seqs = sequences_for_budget(self.general_blocks[torch.randperm(
                len(self.general_blocks), generator=torch.Generator().manual_seed(self.seed))], b.nu_steps, b.nu_batch)
            self.use_fisher(empirical_fisher(self.model, seqs, progress=self.progress))
        return self.fisher

    def use_fisher(self, fisher: Fisher) -> None:
        """EWC-LoRA's Fisher for this comparison (computed here, or kept by an interrupted run), with its cost."""
        self.fisher = fisher
        self.costs.update({"ewc_fisher_s": fisher.seconds, "ewc_fisher_bytes": fisher.nbytes,
                           "ewc_sequences": fisher.sequences})

    def run_method(self, method: str, phi: Optional[float] = None, lam: Optional[float] = None) -> Result:
        """One method's μ phase and evaluation; ``phi`` (HLoRA) and ``lam`` (EWC-LoRA) default to the budget's."""
        b = self.budget
        phi = b.phi if phi is None else phi
        lam = b.lam if lam is None else lam
        if method == "LoRA(mu)":
            return self._mu(self.model, method, self.fresh)
        if method == "LoRA(nu+mu)":
            return self._mu(self.model, method, self.nu_state)
        if method == "rsLoRA(nu+mu)":
            if self.rs_model is None:
                self.rs_model = self._peft(True)
                self.rs_fresh = lora_state(self.rs_model)
            load_lora_state(self.rs_model, self.rs_fresh)
            self._nu(self.rs_model, record=False)
            return self._mu(self.rs_model, method, lora_state(self.rs_model))
        if method == "EWC-LoRA":
            fisher = self.ewc_fisher()
            return self._mu(self.model, method, self.fresh, lambda: EWCPenalty(self.model, fisher, lam))
        if method in ("HLoRA", "HLoRA-layer"):
            weighting = "softmax" if method == "HLoRA" else "uniform"
            load_lora_state(self.model, self.nu_state)
            return self._mu(self.model, method, self.nu_state,
                            lambda: hlora.Regularizer(self.model, self.importance, phi=phi, layer_weighting=weighting,
                                                      anchor="reference"))
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    def phi_sweep(self, phis: List[float], items: Optional[List[data.MCQItem]] = None,
                  done: Optional[Dict[float, Dict[str, float]]] = None,
                  keep: Optional[Callable[[Dict[str, float]], None]] = None) -> List[Dict[str, float]]:
        """HLoRA at several φ (Fig. 6); PPL and accuracy on ``items`` (the validation split by default).
        ``done``: the rows of the φ an interrupted sweep finished (not run again); ``keep`` is handed
        each new row as it ends (``Progress.phi_sweep``)."""
        saved_items, self.test_items = self.test_items, items or self.val_items[: self.budget.eval_items]
        saved_results = dict(self.results)
        rows = []
        try:
            for phi in phis:
                row = (done or {}).get(phi)
                if row is None:
                    res = self.run_method("HLoRA", phi=phi)
                    row = {"phi": phi, "ppl": res.ppl, "acc": res.acc, "acc_norm": res.acc_norm}
                    if keep is not None:
                        keep(row)
                rows.append(row)
        finally:
            self.test_items, self.results = saved_items, saved_results
        return rows


def results_table(results: Dict[str, Result], reference: str = NU) -> str:
    ref = results.get(reference)
    lines = ["| method | general PPL ↓ | rise vs ν | domain acc ↑ | acc_norm | μ time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        rise = f"{r.ppl - ref.ppl:+.2f}" if ref and name not in ("base", reference) else ""
        lines.append(f"| {name} | {r.ppl:.2f} | {rise} | {r.acc:.3f} | {r.acc_norm:.3f} | {r.seconds:.0f} |")
    return "\n".join(lines)


def versus_recording(ewc_s: float, recording_s: float) -> str:
    """EWC's Fisher time against HLoRA's recording overhead, in words. The overhead is a
    difference of two timed runs: at zero it was below the timing noise, and a ratio to it
    would be meaningless."""
    if recording_s <= 0:
        return "HLoRA's recording overhead itself below the timing noise"
    return f"{ewc_s / recording_s:.0f}× the recording overhead"


def save_json(path: str, payload: Dict) -> None:
    """Atomic JSON write (a crashed run never leaves half a results file)."""
    write_json_atomic(path, payload, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))


def _settings(budget: Dict, model_name: Optional[str]) -> Dict:
    """What two runs must share to be set side by side: the budget (JSON-normalized) but the
    thread count, which changes only the speed, and the model (any spelling of the same one)."""
    settings = {k: v for k, v in json.loads(json.dumps(budget, default=list)).items() if k != "threads"}
    return {**settings, "model": models.identity(model_name)}


def check_settings(path: str, budget: Budget, model_name: Optional[str], **run: object) -> None:
    """A run kept from an earlier session (a result or progress file) must have been made like
    the one about to join it — same budget, model and ``run`` (domain, seed) — or results of two
    settings would be set side by side without a word."""
    saved = read_json(path)
    recorded = recorded_settings(saved)
    if recorded is None:
        return
    differ = check.differences({**recorded, **{k: saved.get(k) for k in run}},
                         {**_settings(asdict(budget), model_name), **run})
    if differ:
        raise ValueError(f"{path} was run with other settings ({'; '.join(differ)}): give another --out, or "
                         "remove that file to run again")


def recorded_settings(saved: Dict) -> Optional[Dict]:
    """The settings a saved run was made with (as ``check_settings`` compares them); ``None`` for
    a file written by hand or by an hlora before runs recorded theirs."""
    return _settings(saved["budget"], saved.get("model")) if "budget" in saved else None


def results_payload(results: Dict[str, Result], history: bool = False) -> Dict[str, Dict]:
    """The results as saved: the four numbers of each method (with ``history``, also its loss history
    and extras: what a resumed demo needs for its plots)."""
    keep = ("ppl", "acc", "acc_norm", "seconds") + (("history", "extra") if history else ())
    return {name: {k: getattr(r, k) for k in keep} for name, r in results.items()}


class Progress:
    """A comparison in progress, kept beside its result file (``<result>.partial/``) so a crash
    loses only the phase it was in: the results so far and, once the ν phase is done, the ν adapter
    and its importance, which every method starts from (and EWC's Fisher once computed, and the
    φ sweep's rows). Removed when the result file is written."""

    NU_FORMAT = "hlora-nu-adapter"
    FISHER_FORMAT = "hlora-ewc-fisher"

    def __init__(self, result_path: str, budget: Budget, model_name: Optional[str], domain: str, seed: int) -> None:
        self.folder = result_path + ".partial"
        self.budget, self.model_name, self.run_id = budget, model_name, {"domain": domain, "seed": seed}
        #: The φ sweep's rows so far (the demo's ``--sweep``).
        self.sweep: List[Dict[str, float]] = []
        #: The ν result a progress file recorded without its ν adapter: the rerun must match it.
        self.recorded_nu: Optional[Result] = None
        if os.path.isfile(self._file("progress.json")):
            check_settings(self._file("progress.json"), budget, model_name, **self.run_id)

    def _file(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def run(self, cmp: Comparison, run_base: Callable[[], None], overhead_steps: int,
            log: Callable[[str], None] = print) -> None:
        """The base evaluation (``run_base``), the ν phase with its recording overhead and every
        method, each phase saved as it ends and skipped when an interrupted run finished it."""
        self.resume(cmp, log)
        self.phase(cmp, "base", run_base)

        def nu() -> None:
            cmp.run_nu()
            cmp.measure_recording_overhead(steps=overhead_steps)

        self.phase(cmp, NU, nu)
        for method in METHODS:
            if method == "EWC-LoRA" and method not in cmp.results:
                self.ewc_fisher(cmp)
            self.phase(cmp, method, lambda: cmp.run_method(method))  # noqa: B023 (called at once)

    def ewc_fisher(self, cmp: Comparison) -> None:
        """EWC-LoRA's Fisher — kept as soon as it is computed, so a crash in EWC-LoRA's μ phase
        does not cost it again — or the one an interrupted run kept, with what it cost."""
        if cmp.fisher is not None:
            return
        path = self._file("ewc_fisher.safetensors")
        if os.path.isfile(path):
            tensors, meta = _io.load_checked(path, self.FISHER_FORMAT)
            cmp.use_fisher(Fisher(tensors, int(meta["sequences"]), float(meta["seconds"])))
            return
        fisher = cmp.ewc_fisher()
        os.makedirs(self.folder, exist_ok=True)
        _io.save_atomic(path, fisher.matrices, {"format": self.FISHER_FORMAT, "sequences": str(fisher.sequences),
                                                "seconds": repr(fisher.seconds)})

    def phase(self, cmp: Comparison, name: str, work: Callable[[], object]) -> None:
        """``work`` unless an interrupted run finished it, then the progress saved. ``name`` is the
        result ``work`` adds to ``cmp.results``, or what that result is renamed to (a method at one
        of several φ, say). The ν phase (``"after ν"``) also keeps the ν adapter and importance."""
        if name in cmp.results:
            return
        costs = dict(cmp.costs)
        result = work()
        if isinstance(result, Result) and result.method != name:
            cmp.results[name] = cmp.results.pop(result.method)
        if name == NU:
            if self.recorded_nu is not None:  # rebuilt for its tensors: the recorded numbers stay
                check_reproduced(self.recorded_nu, cmp.results[NU], self.folder)
                cmp.results[NU], cmp.costs = self.recorded_nu, costs
            self._save_nu(cmp)
        self._save(cmp)

    def phi_sweep(self, cmp: Comparison, phis: List[float]) -> List[Dict[str, float]]:
        """``cmp.phi_sweep`` on the validation split, each φ kept as it ends (a crash loses only
        the φ in progress; the φ done are not run again)."""
        results = dict(cmp.results)  # the methods' results: the sweep's own runs are not among them

        def keep(row: Dict[str, float]) -> None:
            self.sweep.append(row)
            self._save(cmp, results)

        return cmp.phi_sweep(phis, done={row["phi"]: row for row in self.sweep}, keep=keep)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def resume(self, cmp: Comparison, log: Callable[[str], None] = print) -> None:
        """The results (and, past the ν phase, the ν adapter and importance) an interrupted run kept."""
        if not os.path.isfile(self._file("progress.json")):
            return
        saved = read_json(self._file("progress.json"))
        for name, r in saved["results"].items():
            cmp.results[name] = Result(name, r["ppl"], r["acc"], r["acc_norm"], r["seconds"], r.get("history", []),
                                       r.get("extra", {}))
        cmp.costs.update(saved["costs"])
        self.sweep = saved.get("phi_sweep", [])
        if NU in cmp.results and not os.path.isfile(self._file("nu_adapter.safetensors")):
            # progress.json is small enough to commit; the ν adapter and Ω beside it are not (a
            # fresh clone has only the former): the ν phase runs again and must reproduce its result.
            self.recorded_nu = cmp.results.pop(NU)
            log(f"  {self.folder} keeps no ν adapter: the ν phase runs again")
        elif NU in cmp.results:
            tensors, meta = _io.load_checked(self._file("nu_adapter.safetensors"), self.NU_FORMAT)
            cmp.nu_state = tensors_state(tensors, json.loads(meta["names"]))
            cmp.importance = hlora.Importance.load(self._file("importance.safetensors"))
        log(f"  resumed from {self.folder}: {', '.join(cmp.results)} done earlier")

    def _save_nu(self, cmp: Comparison) -> None:
        """The ν adapter and importance, before the progress that says the ν phase is done."""
        os.makedirs(self.folder, exist_ok=True)
        _io.save_atomic(self._file("nu_adapter.safetensors"), state_tensors(cmp.nu_state),
                        {"format": self.NU_FORMAT, "names": json.dumps(list(cmp.nu_state))})
        cmp.importance.save(self._file("importance.safetensors"))

    def _save(self, cmp: Comparison, results: Optional[Dict[str, Result]] = None) -> None:
        os.makedirs(self.folder, exist_ok=True)
        save_json(self._file("progress.json"), {**self.run_id, "budget": self.budget, "model": self.model_name,
                                                "results": results_payload(cmp.results if results is None else results,
                                                                           history=True),
                                                "costs": cmp.costs, "phi_sweep": self.sweep})


def check_reproduced(recorded: Result, rerun: Result, folder: str) -> None:
    """A phase run again because its saved tensors are gone (``rerun``) must give what the progress
    recorded: the results kept after it were measured from the first run's tensors."""
    if abs(rerun.ppl - recorded.ppl) > 1e-4 * abs(recorded.ppl) or abs(rerun.acc - recorded.acc) > 1e-9:
        raise RuntimeError(f"{recorded.method} run again gives PPL {rerun.ppl:.6g}, accuracy {rerun.acc:.4f}; "
                           f"{folder} recorded {recorded.ppl:.6g}, {recorded.acc:.4f}: this machine does not "
                           f"reproduce the run, so its later results cannot be mixed with new ones; remove "
                           f"{folder} to start it over")


def finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)
