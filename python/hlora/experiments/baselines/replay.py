"""Replay: a fraction p of every domain step's tokens drawn from the general text the ν phase
trained on (the same text HLoRA records Ω on), trained with the domain batch in one loss."""

from __future__ import annotations

from typing import Dict, Iterator

import torch

from hlora import _checks as check


def token_stream(blocks: torch.Tensor, seed: int) -> Iterator[int]:
    """The general blocks' tokens, block after block in a seeded order, round and round."""
    g = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(len(blocks), generator=g).tolist():
            yield from blocks[i].tolist()


def replay_batches(batches: Iterator[Dict[str, torch.Tensor]], general_blocks: torch.Tensor, fraction: float,
                   pad_id: int, seed: int) -> Iterator[Dict[str, torch.Tensor]]:
    """Each domain batch with one more row: G general tokens, G = round(p / (1 − p) · T) for the
    batch's T domain tokens (attention mask), so that G / (T + G) = p; the loss covers every general
    token (and, as before, the domain answers). Rows are widened with padding as needed."""
    fraction = check.non_negative(fraction, "fraction")
    if fraction >= 1:
        raise ValueError(f"fraction must be in [0, 1): the share of each step's tokens that is general text, "
                         f"got {fraction}")
    stream = token_stream(general_blocks, seed)
    for batch in batches:
        domain_tokens = int(batch["attention_mask"].sum())
        count = round(fraction / (1 - fraction) * domain_tokens)
        if count < 2:  # a row of one token predicts nothing
            yield batch
            continue
        ids = torch.tensor([next(stream) for _ in range(count)], dtype=torch.long)
        rows, width = batch["input_ids"].shape
        width = max(width, count)
        out = {"input_ids": torch.full((rows + 1, width), pad_id, dtype=torch.long),
               "labels": torch.full((rows + 1, width), -100, dtype=torch.long),
               "attention_mask": torch.zeros((rows + 1, width), dtype=torch.long)}
        for key in out:
            out[key][:rows, :batch[key].shape[1]] = batch[key]
        out["input_ids"][rows, :count] = ids
        out["labels"][rows, :count] = ids
        out["attention_mask"][rows, :count] = 1
        yield out
