"""Metrics: general perplexity (forgetting) and domain multiple-choice accuracy (learning)."""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

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

    Each prompt goes through the model once, ``batch_size`` prompts a pass, left-padded (with
    matching position ids) so they all end at the last position, which predicts every option's
    first token. The options' further tokens are then run on that pass's key/value cache, a copy
    per option: a question's four options cost one prompt, not four (2.4–3.8× faster on the
    study's sets). Scores match whole-sequence scoring to < 1e-4 nats (SmolLM2, four adapters,
    four sets: no prediction of 5 188 changed; see docs/experiments.md)."""
    if len(items) == 0:
        raise ValueError("items is empty: no multiple-choice questions to score")
    batch_size = check.count(batch_size, "batch_size")
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    contexts = [tokenizer(prompt(item), add_special_tokens=False).input_ids for item in items]
    options = [[tokenizer(" " + option, add_special_tokens=False).input_ids for option in item["options"]]
               for item in items]
    scores: List[List[float]] = [[0.0] * len(item["options"]) for item in items]
    order = sorted(range(len(items)), key=lambda i: len(contexts[i]))  # little padding within a pass
    for start in tqdm(range(0, len(order), batch_size), desc="multiple choice", disable=not progress, leave=False):
        chunk = order[start:start + batch_size]
        ids, mask = left_padded([contexts[i] for i in chunk], pad)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    position_ids=(mask.cumsum(-1) - 1).clamp_min(0).to(device), use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), -1)
        rows = []  # (row of the chunk, item, option) for options longer than one token
        for j, i in enumerate(chunk):
            for k, cont in enumerate(options[i]):
                scores[i][k] = float(first[j, cont[0]])
                if len(cont) > 1:
                    rows.append((j, i, k))
        rows.sort(key=lambda r: len(options[r[1]][r[2]]))
        cache_name = "cache" if "cache" in out else "past_key_values"  # the newer transformers' name, the older
        for s in range(0, len(rows), batch_size):
            _score_rest(model, cache_name, out[cache_name], mask, rows[s:s + batch_size], options, scores, pad,
                        device)
    return scores


def left_padded(seqs: Sequence[List[int]], pad: int):
    """Token sequences as one batch, padded on the left (ids, attention mask): each ends at the last
    position."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, width - len(s):] = torch.tensor(s)
        mask[j, width - len(s):] = 1
    return ids, mask


def _score_rest(model, cache_name: str, prompt_cache, prompt_mask: torch.Tensor, rows: List[tuple],
                options: List[List[List[int]]], scores: List[List[float]], pad: int, device) -> None:
    """Adds log p(option tokens 2…n | prompt, earlier option tokens) for these (row, item,
    option)s: the option's tokens but its last, right-padded, on a copy of the prompts' cache
    (right padding: a padded position is never attended by a real one)."""
    conts = [options[i][k] for _, i, k in rows]
    width = max(len(c) for c in conts) - 1
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    cont_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, c in enumerate(conts):
        ids[n, :len(c) - 1] = torch.tensor(c[:-1])
        cont_mask[n, :len(c) - 1] = 1
    select = torch.tensor([j for j, _, _ in rows])
    cache = copy.deepcopy(prompt_cache)
    cache.reorder_cache(select.to(device))  # one cache row per option (index_select: repeats allowed)
    mask = torch.cat([prompt_mask[select], cont_mask], dim=1)
    positions = prompt_mask[select].sum(-1, keepdim=True) + torch.arange(width)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   use_cache=True, **{cache_name: cache}).logits.float()
    logp = torch.log_softmax(logits, -1)
    for n, ((_, i, k), c) in enumerate(zip(rows, conts)):
        steps = torch.arange(len(c) - 1)
        scores[i][k] += float(logp[n, steps, torch.tensor(c[1:])].sum())


def choices(scores: Sequence[Sequence[float]], items: Sequence[MCQItem]) -> List[Tuple[int, int]]:
    """Per item, the option acc picks (argmax of Σ log p) and the one acc_norm picks (argmax of
    Σ log p / characters of the option)."""
    picked = []
    for item, s in zip(items, scores):
        norm = [v / max(1, len(o)) for v, o in zip(s, item["options"])]
        picked.append((max(range(len(s)), key=lambda k: s[k]), max(range(len(norm)), key=lambda k: norm[k])))
    return picked


def mcq_accuracy(model, tokenizer, items: Sequence[MCQItem], batch_size: int = 32,
                 progress: bool = False) -> Dict[str, float]:
    """acc and acc_norm (see :func:`choices`)."""
    picked = choices(option_logprobs(model, tokenizer, items, batch_size, progress), items)
    acc = sum(plain == item["answer"] for (plain, _), item in zip(picked, items))
    acc_norm = sum(norm == item["answer"] for (_, norm), item in zip(picked, items))
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}
