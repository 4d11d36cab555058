"""The ``hlora`` command line.

    hlora demo    the main job on the embedded defaults
    hlora bench   kernels vs the plain-PyTorch formulas (see hlora.bench)
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

import hlora


def _quick_example() -> None:
    """Record ω over a few real optimizer steps of a toy LoRA layer, finalize Ω, and pull a
    drifted adapter back with the penalty — the three ops in ten lines."""
    from hlora import ops

    torch.manual_seed(0)
    out_f, in_f, r, s, lr = 64, 48, 4, 2.0, 0.05
    w0 = torch.randn(out_f, in_f) / in_f**0.5
    a = (torch.randn(r, in_f) * 0.1).requires_grad_()
    b = torch.zeros(out_f, r, requires_grad=True)
    target = torch.randn(out_f, in_f) * 0.05
    opt = torch.optim.SGD([a, b], lr=lr)
    omega = torch.zeros(out_f, in_f)
    for _ in range(30):
        x = torch.randn(32, in_f)
        loss = ((x @ (w0 + s * b @ a).T - x @ (w0 + target).T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        a0, b0, ga, gb = a.detach().clone(), b.detach().clone(), a.grad.clone(), b.grad.clone()
        opt.step()
        ops.accumulate_omega_(omega, a0, b0, ga, gb, a.detach(), b.detach(), lr=lr, scaling=s)
    big_omega = ops.finalize_importance(omega, a.detach(), b.detach(), scaling=s, xi=1e-3)
    a_ref, b_ref = a.detach().clone(), b.detach().clone()
    with torch.no_grad():
        a.add_(torch.randn_like(a) * 0.05)
    penalty = ops.importance_penalty(big_omega, a, b, a_ref, b_ref, scaling=s)
    penalty.backward()
    print(f"  loss after 30 steps {loss.item():.4f}; Ω: {int((big_omega > 0).sum())}/{big_omega.numel()} "
          f"entries > 0, ‖Ω‖ = {big_omega.norm():.3g}; penalty of a drifted A = {penalty.item():.4g}, "
          f"‖∂P/∂A‖ = {a.grad.norm():.3g}")


def cmd_demo(args: argparse.Namespace) -> int:
    from hlora import bench

    print(f"hlora {hlora.__version__}, backend {hlora.backend()}, torch {torch.__version__}")
    print("1) the ops on a toy LoRA layer:")
    _quick_example()
    print("2) fused kernels vs the plain-PyTorch formulas (medians, 2 threads):")
    rows = bench.run(threads=args.threads, repeats=args.repeats)
    print(bench.format_table(rows))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job on the embedded defaults")
    demo.add_argument("--threads", type=int, default=2)
    demo.add_argument("--repeats", type=int, default=7)
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("bench", help="benchmark the kernels (options: hlora bench --help)", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from hlora import bench

        return bench.main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
