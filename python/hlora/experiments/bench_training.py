"""Overhead of hlora per LoRA training step: plain step vs. step + recording (before/after
hooks, the batched ω update) vs. step + penalty (forward + backward), medians over steps.

    python -m hlora.experiments.bench_training [--model tiny|smollm2|llama-3b-shape|gptj-6b-shape] [--steps 8]
        [--batch 4] [--seq 256] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List, Optional

import torch

import hlora
from hlora.adapters import find_adapted
from hlora.experiments._args import positive_int, require_device

#: Random-weight models with the shapes of the paper's GPU models (DESIGN §5).
SHAPE_MODELS = {
    "llama-3b-shape": ("llama", dict(vocab_size=32000, hidden_size=3072, intermediate_size=8192,
                                     num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8)),
    "gptj-6b-shape": ("gptj", dict(vocab_size=50400, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                                   n_positions=4096)),
}


def _model(name: str, dtype: torch.dtype, device: str, r: int):
    from peft import LoraConfig, get_peft_model

    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256,
                                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    elif name in SHAPE_MODELS:
        from transformers import GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM

        family, kwargs = SHAPE_MODELS[name]
        config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (GPTJConfig, GPTJForCausalLM)
        torch.manual_seed(0)
        with torch.device(device):  # initialise on the device: billions of weights
            base = model_cls(config_cls(**kwargs))
    else:
        from hlora.experiments import models

        base, _ = models.load(name)
    base = base.to(device=device, dtype=dtype)
    cfg = LoraConfig(r=r, lora_alpha=4 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(base, cfg)


def _time(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def run(model_name: str = "tiny", steps: int = 8, batch: int = 4, seq: int = 256, device: str = "cpu",
        dtype: torch.dtype = torch.float32, r: int = 8) -> Dict[str, float]:
    model = _model(model_name, dtype, device, r)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(steps + 2)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=8e-4)
    recorder = hlora.ImportanceRecorder(model, opt)
    plain: List[float] = []
    record: List[float] = []
    penalty: List[float] = []
    reg: Optional[hlora.Regularizer] = None
    for i, ids in enumerate(data):
        t0 = _time(device)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        t1 = _time(device)
        recorder.before_step()
        t2 = _time(device)
        opt.step()
        t3 = _time(device)
        recorder.after_step()
        t4 = _time(device)
        if reg is None:
            reg = hlora.Regularizer(model, recorder.finalize(), anchor="reference")
        t5 = _time(device)
        reg.penalty().backward()
        t6 = _time(device)
        if i >= 2:  # warm-up
            plain.append((t1 - t0) + (t3 - t2))
            record.append((t2 - t1) + (t4 - t3))
            penalty.append(t6 - t5)
    step, rec, pen = statistics.median(plain), statistics.median(record), statistics.median(penalty)
    return {"step_s": step, "record_s": rec, "penalty_s": pen, "record_pct": 100 * rec / step,
            "penalty_pct": 100 * pen / step,
            "matrices": len(find_adapted(model)), "omega_entries": sum(o.numel() for o in recorder.omega)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hlora.experiments.bench_training",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny",
                        help="tiny | smollm2 | llama-3b-shape | gptj-6b-shape (random weights) | an HF name or "
                             "path (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=8,
                        help="timed steps, after two warm-up steps (default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=4, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq", type=positive_int, default=256, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the model and the kernels run (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the model's dtype (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default: %(default)s)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    require_device(parser, args.device)
    torch.set_num_threads(args.threads)
    res = run(args.model, args.steps, args.batch, args.seq, args.device, getattr(torch, args.dtype), args.rank)
    print(f"hlora {hlora.__version__} backend={hlora.backend()} model={args.model} device={args.device} "
          f"dtype={args.dtype} r={args.rank} tokens/step={args.batch * args.seq} threads={args.threads}")
    print(f"{res['matrices']} adapted matrices, {res['omega_entries'] / 1e6:.2f} M ω entries")
    print(f"LoRA step {res['step_s'] * 1e3:.1f} ms | recording {res['record_s'] * 1e3:.2f} ms "
          f"({res['record_pct']:.2f} %) | penalty fwd+bwd {res['penalty_s'] * 1e3:.2f} ms ({res['penalty_pct']:.2f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
