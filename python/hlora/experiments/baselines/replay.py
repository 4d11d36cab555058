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
    """Each domain batch with G general tokens added, G = round(p / (1 − p) · T) for the batch's T
    domain tokens (attention mask), so that G / (T + G) = p; the loss covers every general token
    (and, as before, the domain answers). The general tokens fill rows no longer than the general
    blocks (the ν phase's sequence length): one row of G tokens at p = 75 % made every row of the
    batch that wide — 25× a step's compute and 19 GB of activations."""
    fraction = check.non_negative(fraction, "fraction")
    if fraction >= 1:
        raise ValueError(f"fraction must be in [0, 1): the share of each step's tokens that is general text, "
                         f"got {fraction}")
    row_len = general_blocks.shape[1]
    stream = token_stream(general_blocks, seed)
    for batch in batches:
        domain_tokens = int(batch["attention_mask"].sum())
        count = round(fraction / (1 - fraction) * domain_tokens)
        # Rows of row_len tokens, the last holding the rest; a row of one token predicts nothing.
        lengths = [row_len] * (count // row_len) + ([count % row_len] if count % row_len >= 2 else [])
        if not lengths:
            yield batch
            continue
        rows, width = batch["input_ids"].shape
        width = max(width, lengths[0])
        out = {"input_ids": torch.full((rows + len(lengths), width), pad_id, dtype=torch.long),
               "labels": torch.full((rows + len(lengths), width), -100, dtype=torch.long),
               "attention_mask": torch.zeros((rows + len(lengths), width), dtype=torch.long)}
        for key in out:
            out[key][:rows, :batch[key].shape[1]] = batch[key]
        for row, n in enumerate(lengths, start=rows):
            ids = torch.tensor([next(stream) for _ in range(n)], dtype=torch.long)
            out["input_ids"][row, :n] = ids
            out["labels"][row, :n] = ids
            out["attention_mask"][row, :n] = 1
        yield out
