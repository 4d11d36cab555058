"""The ``hlora`` command line.

    hlora demo         the whole comparison on the embedded defaults (SmolLM2, one domain, one seed)
    hlora experiment   the multi-seed grid, resumable, with t-tests and violin plots
    hlora fronts       forgetting-accuracy fronts of HLoRA and the baselines, resumable
    hlora record       LoRA on general text, recording importance
    hlora finetune     fine-tune an adapter on domain MCQ data, optionally regularized
    hlora evaluate     general perplexity and domain accuracy of a model or adapter
    hlora bench        kernels vs the plain-PyTorch formulas (see hlora.experiments.bench)
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional

import torch

import hlora
from hlora._io import atomic_folder, read_json, read_text
from hlora.experiments._args import (
    block_length,
    existing_file,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    saved_adapter,
)
from hlora.experiments.checkpoint import StepCheckpoint, file_digest
from hlora.experiments.data import DOMAINS
from hlora.recorder import CLAMP_POLICIES, DEFAULT_XI
from hlora.regularizer import DEFAULT_PHI, LAYER_WEIGHTINGS

#: Seeds per domain of `hlora experiment` (the README's results): the medical task, the paper's
#: headline, gets the most.
DEFAULT_SEEDS = dict(zip(DOMAINS, (5, 3, 3)))


def _quick_example() -> None:
    """Record ω over a few real optimizer steps of a toy LoRA layer, finalize Ω, and pull a
    drifted adapter back with the penalty — the three ops in ten lines."""
    from hlora import ops

    torch.manual_seed(0)
    out_f, in_f, r, s, lr = 64, 48, 4, 2.0, 0.05
    w0 = torch.randn(out_f, in_f) / in_f**0.5
    a = (torch.randn(r, in_f) * 0.1).requires_grad_()
    b = torch.zeros(out_f, r, requires_grad=True)
    target = torch.randn(out_f, in_f) * 0.05
    opt = torch.optim.SGD([a, b], lr=lr)
    omega = torch.zeros(out_f, in_f)
    for _ in range(30):
        x = torch.randn(32, in_f)
        loss = ((x @ (w0 + s * b @ a).T - x @ (w0 + target).T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        a0, b0, ga, gb = a.detach().clone(), b.detach().clone(), a.grad.clone(), b.grad.clone()
        opt.step()
        ops.accumulate_omega_(omega, a0, b0, ga, gb, a.detach(), b.detach(), lr=lr, scaling=s)
    big_omega = ops.finalize_importance(omega, a.detach(), b.detach(), scaling=s, xi=1e-3)
    a_ref, b_ref = a.detach().clone(), b.detach().clone()
    with torch.no_grad():
        a.add_(torch.randn_like(a) * 0.05)
    penalty = ops.importance_penalty(big_omega, a, b, a_ref, b_ref, scaling=s)
    penalty.backward()
    print(f"  loss after 30 steps {loss.item():.4f}; Ω: {int((big_omega > 0).sum())}/{big_omega.numel()} "
          f"entries > 0, ‖Ω‖ = {big_omega.norm():.3g}; penalty of a drifted A = {penalty.item():.4g}, "
          f"‖∂P/∂A‖ = {a.grad.norm():.3g}")


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on the defaults: SmolLM2, one domain, every method, one seed."""
    import os
    import time

    from hlora.experiments import experiment, plots

    budget = experiment.Budget(threads=args.threads)
    if args.quick:  # for tests and notebooks: the same pipeline at a toy budget
        budget = experiment.Budget(nu_steps=2, nu_batch=2, seq_len=64, mu_steps=2, mu_batch=2, ppl_blocks=2,
                                   eval_items=8, threads=args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    print(f"hlora {hlora.__version__} demo — backend {hlora.backend()}, torch {torch.__version__}, "
          f"domain {args.domain}, seed {args.seed}")
    print(f"DEMO BUDGET (one seed; not the paper's scale): {budget.describe()}")
    results_path = os.path.join(args.out, "results.json")
    # A demo interrupted in this --out resumes after its last finished phase (checked before the model loads).
    progress = experiment.Progress(results_path, budget, args.model, args.domain, args.seed)
    cmp = experiment.Comparison(args.domain, budget, seed=args.seed, model_name=args.model)
    progress.run(cmp, cmp.run_base, overhead_steps=1 if args.quick else 3)
    sweep = progress.phi_sweep(cmp, args.sweep) if args.sweep else []
    table = experiment.results_table(cmp.results)
    print()
    print(f"## Demo-budget run: SmolLM2-135M, {args.domain}, seed {args.seed}")
    print(table)
    costs = cmp.costs
    if "ewc_fisher_s" in costs:
        hl = costs["hlora_recording_overhead_s"]
        print(f"\nimportance cost — HLoRA recording overhead {hl:.1f} s (its whole ν phase "
              f"{costs['hlora_nu_phase_s']:.1f} s), {costs['hlora_importance_bytes'] / 1e6:.1f} MB; "
              f"EWC Fisher {costs['ewc_fisher_s']:.1f} s, {costs['ewc_fisher_bytes'] / 1e6:.1f} MB "
              f"({experiment.versus_recording(costs['ewc_fisher_s'], hl)}, "
              f"{costs['ewc_fisher_s'] / costs['hlora_nu_phase_s']:.1f}× the whole ν phase)")
    figures = {
        "loss_curves": plots.loss_curves({m: cmp.results[m].history for m in experiment.METHODS},
                                         os.path.join(args.out, "loss_curves.png")),
        "importance_heatmap": plots.importance_heatmap(cmp.importance.norms(),
                                                       os.path.join(args.out, "importance_heatmap.png")),
    }
    if sweep:
        figures["phi_sweep"] = plots.phi_sweep(sweep, os.path.join(args.out, "phi_sweep.png"))
    experiment.save_json(results_path, {
        "kind": "demo-budget run", "domain": args.domain, "seed": args.seed, "budget": budget, "model": args.model,
        "results": cmp.results, "costs": costs, "phi_sweep_validation": sweep, "figures": figures,
        "seconds": time.perf_counter() - t0})
    progress.remove()
    print(f"\nresults.json and {len(figures)} plots in {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from hlora.experiments import experiment, grid, models

    seeds = args.seeds or [DEFAULT_SEEDS[d] for d in args.domains]
    if len(seeds) == 1:
        seeds = seeds * len(args.domains)
    if len(seeds) != len(args.domains):
        raise ValueError(f"--seeds needs one count, or one per domain: {len(seeds)} for {len(args.domains)} "
                         f"(--domains {' '.join(args.domains)})")
    phi, lam = args.phi, args.lam
    if args.selection:
        chosen = read_json(args.selection)
        if not (isinstance(chosen, dict) and all(isinstance(chosen.get(k), (int, float)) for k in ("phi", "lam"))):
            raise ValueError(f"{args.selection} has no numbers \"phi\" and \"lam\" "
                             "(it is scripts/select_hyperparameters.py's output)")
        phi, lam = chosen["phi"], chosen["lam"]
        print(f"φ = {phi:g} and λ = {lam:g}, chosen on the validation split ({args.selection})")
        if "model" in chosen and models.identity(chosen["model"]) != models.identity(args.model):
            # Allowed (choosing on a small model is cheap), but Ω's scale, and so φ's, moves with the model.
            print(f"note: {args.selection} was chosen on model {models.label(chosen['model'])}, "
                  f"this grid runs {models.label(args.model)}")
    budget = experiment.Budget(threads=args.threads, eval_items=args.eval_items, phi=phi, lam=lam)
    if args.summary_only:
        if not any(grid.load_runs(args.out).values()):  # a mistyped --out, not an empty summary
            raise ValueError(f"--summary-only: no finished runs in {args.out} (its <domain>/seedN.json files)")
        print(grid.summarize(args.out))
        return 0
    grid.run_grid(args.out, args.domains, seeds, budget, model_name=args.model)
    print(grid.summarize(args.out))
    return 0


def cmd_fronts(args: argparse.Namespace) -> int:
    from hlora.experiments import experiment, fronts, fronts_summary

    if args.summary_only:
        if not os.path.isdir(args.out):  # a mistyped --out, not an empty summary
            raise ValueError(f"--summary-only: no such folder {args.out}")
        print(fronts_summary.summarize(args.out))
        return 0
    seeds = args.seeds or [fronts.SEEDS[d] for d in args.domains]
    if len(seeds) == 1:
        seeds = seeds * len(args.domains)
    if len(seeds) != len(args.domains):
        raise ValueError(f"--seeds needs one count, or one per domain: {len(seeds)} for {len(args.domains)}")
    budget = experiment.Budget(threads=args.threads, eval_items=args.eval_items)
    knowledge = None  # every general-knowledge item of the split
    if args.quick:  # for tests: the same study at a toy budget
        budget = experiment.Budget(nu_steps=2, nu_batch=2, seq_len=32, mu_steps=2, mu_batch=2, ppl_blocks=2,
                                   eval_items=4, threads=args.threads)
        knowledge = 4
    print(f"fronts study — {budget.describe()}")
    if args.validation_only:
        chosen = fronts.validate(args.out, budget, args.model, knowledge_items=knowledge)
        print(fronts_summary.summarize(args.out))
        print(f"test values: {chosen['values']}")
        return 0
    fronts.study(args.out, budget, args.domains, seeds, model_name=args.model, knowledge_items=knowledge)
    print(fronts_summary.summarize(args.out))
    return 0


def _peft_model(model_name, r: int, alpha: int, rslora: bool, seed: int = 0, adapter: str = None):
    from peft import LoraConfig, PeftModel, get_peft_model

    from hlora.experiments import models

    base, tokenizer = models.load(model_name)
    if adapter:
        return PeftModel.from_pretrained(base, adapter, is_trainable=True), tokenizer
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, use_rslora=rslora)
    torch.manual_seed(seed)  # A's random initialization: --seed's promise
    return get_peft_model(base, cfg), tokenizer


#: Options that change how a run goes, not what it computes: a run resumes across them.
_NOT_SETTINGS = ("func", "out", "threads", "checkpoint_every")


def _step_checkpoint(args: argparse.Namespace) -> StepCheckpoint:
    """``<out>/resume.pt`` for this command's run, checked against its arguments now (before the
    model loads). Input files count by content, the model by identity."""
    from hlora.experiments import models

    settings = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    settings["model"] = models.identity(args.model)
    for key in ("text", "mcq", "importance"):
        if settings.get(key) is not None:
            settings[key] = file_digest(settings[key])
    if settings.get("adapter") is not None:
        weights = [f for f in sorted(os.listdir(args.adapter)) if f.startswith("adapter_model.")]
        settings["adapter"] = [file_digest(os.path.join(args.adapter, f)) for f in weights]
    return StepCheckpoint(os.path.join(args.out, "resume.pt"), settings, args.checkpoint_every)


def _say_resumed(checkpoint: StepCheckpoint, steps: int) -> None:
    if checkpoint.step:
        print(f"resuming from {checkpoint.path}: {checkpoint.step} of {steps} steps done earlier")


def cmd_record(args: argparse.Namespace) -> int:
    """LoRA on a general text file, recording Ω; saves the adapter and the importance file."""
    import os

    from hlora.experiments import data, experiment
    from hlora.experiments import eval as metrics

    torch.set_num_threads(args.threads)
    # Inputs read and the output folder made before the model loads: a bad file or an unwritable
    # --out fails in seconds, not after the run it would have lost.
    os.makedirs(args.out, exist_ok=True)
    text = read_text(args.text) if args.text else data.general_text("train")
    checkpoint = _step_checkpoint(args)
    model, tokenizer = _peft_model(args.model, args.r, args.alpha, args.rslora, args.seed)
    blocks = metrics.token_blocks(tokenizer, text, args.seq_len)
    recorder = hlora.ImportanceRecorder(model, xi=args.xi, clamp=args.clamp)
    _say_resumed(checkpoint, args.steps)
    experiment.train(model, experiment.general_batches(blocks, args.batch, args.steps, args.seed), args.steps,
                     args.lr, recorder=recorder, desc="recording", checkpoint=checkpoint)
    with atomic_folder(os.path.join(args.out, "adapter")) as folder:
        model.save_pretrained(folder)
    imp = recorder.finalize()
    imp.save(os.path.join(args.out, "importance.safetensors"))
    checkpoint.remove()
    print(f"recorded {imp.meta['steps']} steps ({imp.meta['skipped_steps']} skipped) over {len(imp.names)} "
          f"matrices → {args.out}/importance.safetensors, adapter in {args.out}/adapter")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tunes an adapter on a domain MCQ file (question + answer), optionally regularized."""
    import os

    from hlora.experiments import data, experiment

    torch.set_num_threads(args.threads)
    if args.adapter and os.path.realpath(os.path.join(args.out, "adapter")) == os.path.realpath(args.adapter):
        # `record --out DIR` then `finetune --adapter DIR/adapter --out DIR` would save the domain
        # adapter over the general one it started from: the ν run lost without a word.
        raise ValueError(f"--out {args.out} would save over the adapter it continues ({args.adapter}); "
                         "give another --out")
    os.makedirs(args.out, exist_ok=True)  # inputs and --out first, as in cmd_record
    items = data.load_mcq_file(args.mcq) if args.mcq else data.mcq(args.domain, "train")
    importance = hlora.Importance.load(args.importance) if args.importance else None
    checkpoint = _step_checkpoint(args)
    model, tokenizer = _peft_model(args.model, args.r, args.alpha, args.rslora, args.seed, adapter=args.adapter)
    penalty = None
    if importance is not None:
        penalty = hlora.Regularizer(model, importance, phi=args.phi, layer_weighting=args.layer_weighting).penalty
    _say_resumed(checkpoint, args.steps)
    hist = experiment.train(model, experiment.domain_batches(tokenizer, items, args.batch, args.steps, args.seed),
                            args.steps, args.lr, penalty=penalty, desc="fine-tuning", checkpoint=checkpoint)
    with atomic_folder(os.path.join(args.out, "adapter")) as folder:  # a rerun's crash keeps the last adapter
        model.save_pretrained(folder)
    experiment.save_json(os.path.join(args.out, "history.json"), {"history": hist})
    checkpoint.remove()
    print(f"final task loss {hist[-1]['task_loss']:.4f}, penalty {hist[-1]['penalty']:.4g} → {args.out}/adapter")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """General perplexity on a text file and accuracy on an MCQ JSONL file, for a model or adapter."""
    from hlora.experiments import data
    from hlora.experiments import eval as metrics

    torch.set_num_threads(args.threads)
    # Both inputs read before the model loads and perplexity runs (minutes): a bad MCQ file
    # fails at once.
    text = read_text(args.text) if args.text else data.general_text("test")
    items = data.load_mcq_file(args.mcq) if args.mcq else data.mcq(args.domain, "test")
    if args.adapter:
        model, tokenizer = _peft_model(args.model, 8, 32, False, adapter=args.adapter)
    else:
        from hlora.experiments import models

        model, tokenizer = models.load(args.model)
    blocks = metrics.token_blocks(tokenizer, text, args.seq_len, args.max_blocks)
    ppl = metrics.perplexity(model, blocks, progress=True)
    acc = metrics.mcq_accuracy(model, tokenizer, items[: args.max_items], progress=True)
    print(f"general perplexity {ppl['ppl']:.3f} over {ppl['tokens']} tokens; domain accuracy {acc['acc']:.4f} "
          f"(acc_norm {acc['acc_norm']:.4f}) over {acc['n']} items")
    return 0


MODEL_HELP = "HF causal LM name or path (default: SmolLM2-135M-Instruct, offline)"
THREADS_HELP = "torch CPU threads, the kernels' too (default: %(default)s)"
SEED_HELP = "data order and adapter initialization (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The ``hlora`` parser: one sub-command each, every option with a help line (and its default)."""
    parser = argparse.ArgumentParser(prog="hlora", description=__doc__.splitlines()[0])
    provider = hlora.backend_info()["provider"]
    parser.add_argument("--version", action="version",
                        help="hlora's version, its backend (and provider) and torch's version",
                        version=f"hlora {hlora.__version__} (backend {hlora.backend()}"
                                f"{f', provider {provider}' if provider else ''}, torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the whole comparison on the defaults (SmolLM2, one domain, one seed)")
    demo.add_argument("--out", default="out/demo", help="folder for results.json and the plots (default: %(default)s)")
    demo.add_argument("--domain", default="medical", choices=DOMAINS,
                      help="the fine-tuning task (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    demo.add_argument("--model", default=None, help=MODEL_HELP)
    demo.add_argument("--threads", type=positive_int, default=2, help=THREADS_HELP)
    demo.add_argument("--sweep", type=non_negative_float, nargs="*", default=[],
                      help="also run HLoRA at these φ on the validation split (Fig. 6; ~1.5 min each)")
    demo.add_argument("--quick", action="store_true", help="a toy budget (for tests)")
    demo.set_defaults(func=cmd_demo)
    exp = sub.add_parser("experiment", help="the multi-seed grid: domains × seeds × methods (resumable)")
    exp.add_argument("--out", default="out/experiment",
                     help="folder for each run's results, summary.md and the plots; finished runs in it are kept "
                          "(default: %(default)s)")
    exp.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS,
                     help="the fine-tuning tasks (default: all three)")
    exp.add_argument("--seeds", nargs="+", type=positive_int, default=None,
                     help="seed count per domain, in --domains' order, or one count for all "
                          "(default: " + ", ".join(f"{d} {n}" for d, n in DEFAULT_SEEDS.items()) + ")")
    exp.add_argument("--eval-items", type=positive_int, default=600,
                     help="test items per evaluation (default: %(default)s)")
    exp.add_argument("--phi", type=non_negative_float, default=DEFAULT_PHI,
                     help="HLoRA's penalty weight φ (default: %(default)g)")
    exp.add_argument("--lam", type=non_negative_float, default=1e4,
                     help="EWC-LoRA's penalty weight λ (default: %(default)g)")
    exp.add_argument("--selection", type=existing_file, default=None,
                     help="take φ and λ from scripts/select_hyperparameters.py's output (out/selection.json)")
    exp.add_argument("--model", default=None, help=MODEL_HELP)
    exp.add_argument("--threads", type=positive_int, default=2, help=THREADS_HELP)
    exp.add_argument("--summary-only", action="store_true", help="only rebuild summary.md and the plots")
    exp.set_defaults(func=cmd_experiment)
    fr = sub.add_parser("fronts", help="forgetting-accuracy fronts: HLoRA against the baselines, each over its knob "
                                       "(resumable; hours)")
    fr.add_argument("--out", default="out/fronts",
                    help="folder for validation.json, each run's results, summary.md and the plots; finished runs "
                         "in it are kept (default: %(default)s)")
    fr.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS,
                    help="the fine-tuning tasks of the test pass (default: all three)")
    fr.add_argument("--seeds", nargs="+", type=positive_int, default=None,
                    help="test seeds per domain, in --domains' order, or one count for all (default: medical 3, "
                         "science 2, physical 2)")
    fr.add_argument("--eval-items", type=positive_int, default=200,
                    help="domain items per evaluation (default: %(default)s)")
    fr.add_argument("--validation-only", action="store_true",
                    help="only the validation pass that fixes every knob's test values")
    fr.add_argument("--summary-only", action="store_true", help="only rebuild summary.md and the plots")
    fr.add_argument("--model", default=None, help=MODEL_HELP)
    fr.add_argument("--threads", type=positive_int, default=2, help=THREADS_HELP)
    fr.add_argument("--quick", action="store_true", help="a toy budget (for tests)")
    fr.set_defaults(func=cmd_fronts)

    def common(p, steps, lr=8e-4):
        p.add_argument("--model", default=None, help=MODEL_HELP)
        p.add_argument("--out", required=True, help="folder for the adapter and what else the command writes")
        p.add_argument("--steps", type=positive_int, default=steps, help="optimizer steps (default: %(default)s)")
        p.add_argument("--lr", type=positive_float, default=lr, help="AdamW learning rate (default: %(default)g)")
        p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
        p.add_argument("--threads", type=positive_int, default=2, help=THREADS_HELP)
        p.add_argument("--r", type=positive_int, default=8, help="LoRA rank of a new adapter (default: %(default)s)")
        p.add_argument("--alpha", type=positive_int, default=32,
                       help="LoRA alpha of a new adapter; scaling s = alpha / r (default: %(default)s)")
        p.add_argument("--rslora", action="store_true", help="a new adapter's rank-stabilized scaling s = alpha / √r")
        p.add_argument("--checkpoint-every", type=non_negative_int, default=50,
                       help="keep the run's state in OUT/resume.pt every N steps; rerun the same command to "
                            "resume after a crash (0: never; default: %(default)s)")

    rec = sub.add_parser("record", help="LoRA on general text, recording importance")
    common(rec, 30)
    rec.add_argument("--text", type=existing_file, default=None,
                     help="a UTF-8 plain-text file (default: the shipped general corpus)")
    rec.add_argument("--batch", type=positive_int, default=4,
                     help="blocks of --seq-len tokens per step (default: %(default)s)")
    rec.add_argument("--seq-len", type=block_length, default=128, help="tokens per block (default: %(default)s)")
    rec.add_argument("--xi", type=positive_float, default=DEFAULT_XI,
                     help="ξ of Ω = ω / (Δ² + ξ) (Eq. 13; default: %(default)g)")
    rec.add_argument("--clamp", default="final", choices=CLAMP_POLICIES,
                     help="clamp negative Ω to 0 at the end (final), the running ω every step (step), "
                          "or never (none) (default: %(default)s)")
    rec.set_defaults(func=cmd_record)
    fin = sub.add_parser("finetune", help="fine-tune an adapter on domain MCQ data, optionally regularized")
    common(fin, 40)
    fin.add_argument("--adapter", type=saved_adapter, default=None,
                     help="continue this saved adapter, with its own r and alpha (else a fresh one)")
    fin.add_argument("--importance", type=existing_file, default=None, help="an importance file: regularize with it")
    fin.add_argument("--phi", type=non_negative_float, default=DEFAULT_PHI,
                     help="the penalty's weight φ, with --importance (default: %(default)g)")
    fin.add_argument("--layer-weighting", default="softmax", choices=LAYER_WEIGHTINGS,
                     help="each matrix's weight: softmax of its ‖Ω‖ (Eq. 15) or 1/L (default: %(default)s)")
    fin.add_argument("--mcq", type=existing_file, default=None,
                     help="JSONL of {question, options, answer} (default: --domain's)")
    fin.add_argument("--domain", default="medical", choices=DOMAINS,
                     help="the shipped training split used without --mcq (default: %(default)s)")
    fin.add_argument("--batch", type=positive_int, default=8, help="MCQ items per step (default: %(default)s)")
    fin.set_defaults(func=cmd_finetune)
    ev = sub.add_parser("evaluate", help="general perplexity and domain accuracy of a model or adapter")
    ev.add_argument("--model", default=None, help=MODEL_HELP)
    ev.add_argument("--adapter", type=saved_adapter, default=None,
                    help="a saved adapter on --model (default: the model alone)")
    ev.add_argument("--text", type=existing_file, default=None,
                    help="general UTF-8 text file (default: the shipped held-out text)")
    ev.add_argument("--mcq", type=existing_file, default=None, help="MCQ JSONL file (default: --domain's test split)")
    ev.add_argument("--domain", default="medical", choices=DOMAINS,
                    help="the shipped test split used without --mcq (default: %(default)s)")
    ev.add_argument("--seq-len", type=block_length, default=128,
                    help="tokens per perplexity block (default: %(default)s)")
    ev.add_argument("--max-blocks", type=positive_int, default=None, help="at most this many blocks (default: all)")
    ev.add_argument("--max-items", type=positive_int, default=None, help="at most this many MCQ items (default: all)")
    ev.add_argument("--threads", type=positive_int, default=2, help=THREADS_HELP)
    ev.set_defaults(func=cmd_evaluate)
    sub.add_parser("bench", help="benchmark the kernels (options: hlora bench --help)", add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from hlora.experiments import bench

        return bench.main(argv[1:])
    args = parser.parse_args(argv)
    # PEFT (0.21) asks transformers (5.24) a deprecated question on every get_peft_model: a
    # FutureWarning no user of this command can act on, printed before every run.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        # Bad input found past argument parsing (a missing file, a mismatched adapter): one
        # line, like argparse's own errors. HLORA_DEBUG=1 keeps the traceback.
        if os.environ.get("HLORA_DEBUG"):
            raise
        parser.exit(2, f"hlora {args.command}: error: {err} (HLORA_DEBUG=1 shows where)\n")


if __name__ == "__main__":
    raise SystemExit(main())
