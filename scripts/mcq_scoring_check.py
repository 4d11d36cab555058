"""Multiple-choice scoring on the prompt's key/value cache (``eval.option_logprobs``) against whole
sequences, one per option (how the fronts study scored its first points): the largest difference in
option log-probability, how many predictions (acc and acc_norm) differ, and the time of each, interleaved,
per set. On the offline SmolLM2 with the base model and any adapter files of a fronts run:

    python scripts/mcq_scoring_check.py results/fronts/medical/seed1.json.partial/nu_adapter.safetensors

(an adapter file: ``nu_adapter.safetensors`` or ``<method>.end.safetensors`` of a run's progress folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import List, Sequence

import torch

from hlora import _io
from hlora.adapters import find_adapted
from hlora.experiments import data, experiment, fronts, models
from hlora.experiments import eval as metrics
from hlora.experiments.data import MCQItem, prompt


@torch.no_grad()
def whole_sequence_logprobs(model, tokenizer, items: Sequence[MCQItem], batch_size: int = 32) -> List[List[float]]:
    """The former scorer: prompt + option as one left-padded sequence per option, 32 a pass."""
    model.eval()
    pairs = []
    for qi, item in enumerate(items):
        ctx = tokenizer(prompt(item), add_special_tokens=False).input_ids
        for option in item["options"]:
            pairs.append((qi, ctx, tokenizer(" " + option, add_special_tokens=False).input_ids))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]) + len(pairs[i][2]))
    scores = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i in range(0, len(order), batch_size):
        chunk = [pairs[k] for k in order[i:i + batch_size]]
        seqs = [ctx + cont for _, ctx, cont in chunk]
        keep = max(len(cont) for _, _, cont in chunk) + 1
        ids, mask = metrics.left_padded(seqs, pad)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                       logits_to_keep=keep).logits.float()
        logp = torch.log_softmax(logits, -1)
        for j, (_, _, cont) in enumerate(chunk):
            rows = torch.arange(keep - len(cont) - 1, keep - 1)
            scores[order[i + j]] = float(logp[j, rows, torch.tensor(cont)].sum())
    per_item: List[List[float]] = [[] for _ in items]
    for k, (qi, _, _) in enumerate(pairs):
        per_item[qi].append(scores[k])
    return per_item


def load_adapter(model, path: str) -> None:
    """A run's ν adapter or end adapter, checked as the study checks it (format, checksum)."""
    kind = experiment.Progress.NU_FORMAT if os.path.basename(path) == "nu_adapter.safetensors" else fronts.END_FORMAT
    tensors, meta = _io.load_checked(path, kind)
    experiment.load_lora_state(model, experiment.tensors_state(tensors, json.loads(meta["names"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="*", help="adapter files of a fronts run (the base model is always checked)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(args.threads)
    base, tokenizer = models.load(None)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))
    sets = {"medical": data.mcq("medical", "test")[:200], "science": data.mcq("science", "test")[:200],
            "physical": data.mcq("physical", "test")[:200], "knowledge": data.general_knowledge("test")}
    worst, changed, total, ratios = 0.0, 0, 0, []
    for adapter in ["base model", *args.adapters]:
        if adapter == "base model":
            with torch.no_grad():
                for m in find_adapted(model):
                    m.b.zero_()  # B = 0: the adapter adds nothing
        else:
            load_adapter(model, adapter)
        for name, items in sets.items():
            t0 = time.perf_counter()
            whole = whole_sequence_logprobs(model, tokenizer, items)
            t1 = time.perf_counter()
            cached = metrics.option_logprobs(model, tokenizer, items)
            t2 = time.perf_counter()
            diff = max(abs(x - y) for a, b in zip(whole, cached) for x, y in zip(a, b))
            flips = sum(x != y for w, c in zip(metrics.choices(whole, items), metrics.choices(cached, items))
                        for x, y in zip(w, c))
            worst, changed, total = max(worst, diff), changed + flips, total + 2 * len(items)
            ratios.append((t1 - t0) / (t2 - t1))
            print(f"{adapter[-40:]:>40s}  {name:9s} n={len(items):3d}  max|Δ| {diff:.1e}  changed {flips}  "
                  f"whole {t1 - t0:5.1f} s  cached {t2 - t1:5.1f} s  ({ratios[-1]:.2f}×)", flush=True)
    print(f"largest |Δ| {worst:.1e} nats; predictions changed: {changed} of {total}; "
          f"speed-up median {statistics.median(ratios):.2f}× (range {min(ratios):.2f}–{max(ratios):.2f}×)")


if __name__ == "__main__":
    main()
