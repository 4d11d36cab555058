"""Ω's bytes per rank under FSDP2 for LLaMA-3 models, computed from their shapes: every adapted
matrix's (out, in), rows split over the ranks as torch.chunk splits them (ceil(out / world) rows,
so a rank holds at most that). Prints the markdown table of docs/scaling.md.

    python scripts/omega_memory.py
"""

from __future__ import annotations

from typing import Dict, List, Tuple

#: hidden, layers, attention heads, KV heads, MLP width (the models' published configurations).
MODELS = {"SmolLM2-135M": (576, 30, 9, 3, 1536), "LLaMA-3-8B": (4096, 32, 32, 8, 14336),
          "LLaMA-3-70B": (8192, 80, 64, 8, 28672)}
WORLDS = (1, 2, 8, 16, 32, 64)
DTYPES = (("float32", 4), ("bfloat16", 2))


def matrices(hidden: int, heads: int, kv_heads: int, mlp: int) -> Dict[str, Tuple[int, int]]:
    kv = hidden // heads * kv_heads
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (mlp, hidden), "up_proj": (mlp, hidden), "down_proj": (hidden, mlp)}


def bytes_per_rank(model: str, targets: Tuple[str, ...], world: int, itemsize: int) -> int:
    hidden, layers, heads, kv_heads, mlp = MODELS[model]
    shapes = matrices(hidden, heads, kv_heads, mlp)
    per_layer = sum(-(-shapes[t][0] // world) * shapes[t][1] for t in targets)
    return layers * per_layer * itemsize


def human(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"


def table() -> str:
    all_linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    rows: List[str] = ["| model | LoRA on | Ω dtype | " + " | ".join(f"{w} rank{'s' if w > 1 else ''}" for w in WORLDS)
                       + " |", "|---|---|---|" + "---:|" * len(WORLDS)]
    for model in MODELS:
        for label, targets in (("q_proj, v_proj", ("q_proj", "v_proj")), ("all linear layers", all_linear)):
            for dtype, size in DTYPES:
                cells = [human(bytes_per_rank(model, targets, w, size)) for w in WORLDS]
                rows.append(f"| {model} | {label} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
