"""Metrics: general perplexity (forgetting) and domain multiple-choice accuracy (learning)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from hlora import _checks as check
from hlora.experiments.data import MCQItem, prompt


def token_blocks(tokenizer, text: str, seq_len: int, max_blocks: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping blocks of ``seq_len`` tokens (the tail that does not fill a block is dropped)."""
    # A block of one token predicts nothing: perplexity would divide by zero tokens.
    seq_len = check.count(seq_len, "seq_len", minimum=2)
    if max_blocks is not None:
        max_blocks = check.count(max_blocks, "max_blocks")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens: fewer than one block of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> Dict[str, float]:
    """exp(token-weighted mean natural-log NLL) over every predicted token of the blocks
    (``token_blocks``' (n, seq_len) token ids); ``ppl`` is inf when that mean overflows exp."""
    if not isinstance(blocks, torch.Tensor):
        raise TypeError(f"blocks must be a torch.Tensor of token ids, got {type(blocks).__name__}")
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be (n, seq_len) token ids with n >= 1 and seq_len >= 2, "
                         f"got shape {list(blocks.shape)}")
    if blocks.dtype.is_floating_point or blocks.is_complex() or blocks.dtype == torch.bool:
        raise TypeError(f"blocks must hold integer token ids, got {str(blocks.dtype).replace('torch.', '')}")
    batch_size = check.count(batch_size, "batch_size")
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for i in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress, leave=False):
        ids = blocks[i:i + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
    nll = total_nll / total_tokens
    try:
        ppl = math.exp(nll)
    except OverflowError:  # a diverged model (> 709.8 nats per token): inf, not a crash at the end
        ppl = math.inf
    return {"ppl": ppl, "nll": nll, "tokens": total_tokens}


@torch.no_grad()
def option_logprobs(model, tokenizer, items: Sequence[MCQItem], batch_size: int = 32,
                    progress: bool = False) -> List[List[float]]:
    """Σ log p(option tokens | prompt) for every option of every item (lm-eval-harness style:
    the context and the continuation " option" are tokenized apart and concatenated).

    Sequences are left-padded (with matching position ids) so every continuation ends at the last
    position: only the last few positions go through the vocabulary projection."""
    if len(items) == 0:
        raise ValueError("items is empty: no multiple-choice questions to score")
    batch_size = check.count(batch_size, "batch_size")
    model.eval()
    device = next(model.parameters()).device
    pairs = []
    for qi, item in enumerate(items):
        ctx = tokenizer(prompt(item), add_special_tokens=False).input_ids
        for option in item["options"]:
            cont = tokenizer(" " + option, add_special_tokens=False).input_ids
            pairs.append((qi, ctx, cont))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1]) + len(pairs[i][2]))
    scores: Dict[int, float] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i in tqdm(range(0, len(order), batch_size), desc="multiple choice", disable=not progress, leave=False):
        chunk = [pairs[k] for k in order[i:i + batch_size]]
        seqs = [ctx + cont for _, ctx, cont in chunk]
        width = max(len(s) for s in seqs)
        keep = max(len(cont) for _, _, cont in chunk) + 1
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, width - len(s):] = torch.tensor(s)
            mask[j, width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=keep).logits.float()
        logp = torch.log_softmax(logits, -1)
        for j, (_, _, cont) in enumerate(chunk):
            rows = torch.arange(keep - len(cont) - 1, keep - 1)
            scores[order[i + j]] = float(logp[j, rows, torch.tensor(cont)].sum())
    per_item: List[List[float]] = [[] for _ in items]
    for k, (qi, _, _) in enumerate(pairs):
        per_item[qi].append(scores[k])
    return per_item


def mcq_accuracy(model, tokenizer, items: Sequence[MCQItem], batch_size: int = 32,
                 progress: bool = False) -> Dict[str, float]:
    """acc (argmax of Σ log p) and acc_norm (argmax of Σ log p / characters of the option)."""
    scores = option_logprobs(model, tokenizer, items, batch_size, progress)
    acc = acc_norm = 0
    for item, s in zip(items, scores):
        acc += int(max(range(len(s)), key=lambda k: s[k]) == item["answer"])
        norm = [v / max(1, len(o)) for v, o in zip(s, item["options"])]
        acc_norm += int(max(range(len(norm)), key=lambda k: norm[k]) == item["answer"])
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}
