"""A tiny random Llama with a LoRA adapter and deterministic token data, for fast training tests."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 96
SEQ = 16


def tiny_base_model(seed: int = 0, dtype=torch.float32, heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    """The tiny Llama without an adapter (v_proj has kv_heads · 32/heads rows: 16 by default)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype)


def tiny_lora_model(seed: int = 0, r: int = 4, alpha: int = 8, rslora: bool = False, dtype=torch.float32,
                    heads: int = 4, kv_heads: int = 2):
    base = tiny_base_model(seed, dtype, heads, kv_heads)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      use_rslora=rslora)
    return get_peft_model(base, lora)


class TokenData(torch.utils.data.Dataset):
    """Sequences from a fixed random Markov chain: learnable, so the loss really moves."""

    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        table = torch.randint(0, VOCAB, (VOCAB,), generator=g)
        start = torch.randint(0, VOCAB, (n,), generator=g)
        noise = torch.rand(n, SEQ, generator=g) < 0.1
        rand = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        seqs = torch.empty(n, SEQ, dtype=torch.long)
        seqs[:, 0] = start
        for t in range(1, SEQ):
            seqs[:, t] = torch.where(noise[:, t], rand[:, t], table[seqs[:, t - 1]])
        self.seqs = seqs

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return {"input_ids": self.seqs[i], "labels": self.seqs[i].clone(),
                "attention_mask": torch.ones(SEQ, dtype=torch.long)}


def batches(data: TokenData, batch_size: int):
    for i in range(0, len(data) - batch_size + 1, batch_size):
        items = [data[j] for j in range(i, i + batch_size)]
        yield {k: torch.stack([it[k] for it in items]) for k in items[0]}


def save_tiny_model_folder(folder, seed: int = 0) -> str:
    """The tiny Llama saved as a Hugging Face model folder with a character-level tokenizer of its
    vocabulary (printable ASCII), so code written for `from_pretrained(name)` runs on it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + VOCAB - 1)]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<unk>")
    model = tiny_base_model(seed)
    model.config.max_position_embeddings = 256
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def fsdp2_shard(model) -> None:
    """FSDP2 as accelerate applies it, on the CPU (gloo): each decoder layer of a PEFT-wrapped
    Llama, then the whole model, over every rank of the default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # torch 2.4 and 2.5
        from torch.distributed._composable.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
