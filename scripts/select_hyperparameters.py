"""Chooses φ (HLoRA) and λ (EWC-LoRA) on the validation split before any seeded test run.

Rule: among the values whose validation accuracy is within 1 point of LoRA(ν+μ)'s (φ = 0), take
the one with the lowest general perplexity (held-out text); the same rule for λ against LoRA(μ).
Writes out/selection.json (and phi_sweep_validation.png beside it); an interrupted sweep resumes
from out/selection.json.partial/.

    python scripts/select_hyperparameters.py [--domain medical] [--seed 1000]
"""

import argparse
import json
import os

from hlora.experiments import data, selection
from hlora.experiments._args import non_negative_float


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="medical", choices=data.DOMAINS,
                        help="the validation split to choose on (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1000,
                        help="a seed not used by the test runs (default: %(default)s)")
    parser.add_argument("--phis", type=non_negative_float, nargs="+", default=list(selection.PHIS),
                        help="HLoRA's φ candidates (default: 1e2 1e3 1e4 1e5)")
    parser.add_argument("--lams", type=non_negative_float, nargs="+", default=list(selection.LAMS),
                        help="EWC-LoRA's λ candidates (default: 1e2 1e4 1e6)")
    parser.add_argument("--model", default=None,
                        help="HF causal LM name or path to choose on (default: SmolLM2-135M, offline)")
    parser.add_argument("--out", default="out/selection.json",
                        help="the choice, for `hlora experiment --selection` (default: %(default)s)")
    args = parser.parse_args()
    # The folder first: an unwritable --out fails now, not after the ~15 min sweep.
    try:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    except OSError as err:
        parser.error(f"--out: {err}")
    chosen = selection.select(args.out, args.domain, args.seed, args.phis, args.lams, model_name=args.model)
    print(json.dumps({k: chosen[k] for k in ("reference", "phi_sweep", "lam_sweep", "phi", "lam")}, indent=1))


if __name__ == "__main__":
    main()
