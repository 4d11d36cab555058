"""Chooses φ (HLoRA) and λ (EWC-LoRA) on the validation split before any seeded test run.

Rule: among the values whose validation accuracy is within 1 point of LoRA(ν+μ)'s (φ = 0), take
the one with the lowest general perplexity (held-out text); the same rule for λ against LoRA(μ).
Writes out/selection.json.

    python scripts/select_hyperparameters.py [--domain medical] [--seed 1000]
"""

import argparse
import json
import os

from hlora import data, experiment, plots
from hlora._args import non_negative_float
from hlora._io import write_json_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="medical", choices=data.DOMAINS,
                        help="the validation split to choose on (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1000,
                        help="a seed not used by the test runs (default: %(default)s)")
    parser.add_argument("--phis", type=non_negative_float, nargs="+", default=[1e2, 1e3, 1e4, 1e5],
                        help="HLoRA's φ candidates (default: 1e2 1e3 1e4 1e5)")
    parser.add_argument("--lams", type=non_negative_float, nargs="+", default=[1e2, 1e4, 1e6],
                        help="EWC-LoRA's λ candidates (default: 1e2 1e4 1e6)")
    parser.add_argument("--out", default="out/selection.json",
                        help="the choice, for `hlora experiment --selection` (default: %(default)s)")
    args = parser.parse_args()
    # The folder first: an unwritable --out fails now, not after the ~15 min sweep.
    try:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    except OSError as err:
        parser.error(f"--out: {err}")
    budget = experiment.Budget()
    cmp = experiment.Comparison(args.domain, budget, seed=args.seed, progress=False)
    cmp.test_items = cmp.val_items[: budget.eval_items]  # everything below is scored on validation data
    cmp.run_nu()
    rows = {"LoRA(nu+mu)": vars(cmp.run_method("LoRA(nu+mu)")), "LoRA(mu)": vars(cmp.run_method("LoRA(mu)"))}
    phi_rows = []
    for phi in args.phis:
        res = cmp.run_method("HLoRA", phi=phi)
        phi_rows.append({"phi": phi, "ppl": res.ppl, "acc": res.acc})
    lam_rows = []
    for lam in args.lams:
        cmp.budget.lam = lam
        res = cmp.run_method("EWC-LoRA")
        lam_rows.append({"lam": lam, "ppl": res.ppl, "acc": res.acc})

    def pick(candidates, reference_acc, key):
        ok = [c for c in candidates if c["acc"] >= reference_acc - 0.01] or candidates
        return min(ok, key=lambda c: c["ppl"])[key]

    selection = {"domain": args.domain, "seed": args.seed, "budget": vars(budget),
                 "reference": {k: {"ppl": v["ppl"], "acc": v["acc"]} for k, v in rows.items()},
                 "phi_sweep": phi_rows, "lam_sweep": lam_rows,
                 "phi": pick(phi_rows, rows["LoRA(nu+mu)"]["acc"], "phi"),
                 "lam": pick(lam_rows, rows["LoRA(mu)"]["acc"], "lam")}
    write_json_atomic(args.out, selection)  # what `hlora experiment --selection` reads
    plots.phi_sweep(phi_rows, os.path.join(os.path.dirname(args.out), "phi_sweep_validation.png"),
                    baseline=selection["reference"]["LoRA(nu+mu)"])
    print(json.dumps({k: selection[k] for k in ("reference", "phi_sweep", "lam_sweep", "phi", "lam")}, indent=1))


if __name__ == "__main__":
    main()
