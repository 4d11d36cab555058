"""Times the fused CUDA kernels' tuning variants (HLORA_CUDA_DEFINES, see src/cuda/kernels.cu)
on a whole LLaMA-3.2-3B-shaped model's matrices, each variant in a fresh process (NVRTC compiles
it), and prints the device time of each kernel family per call (torch.profiler, mean of 5 calls).

    python scripts/dev/gpu_variants.py                    # every variant; prints the fastest defines
    python scripts/dev/gpu_variants.py --dry-run          # the same on CPU through the emulator
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

#: "" is the source's defaults (4 blocks per multiprocessor for each); 0 lets ptxas choose.
VARIANTS = ["", "-DHL_OMEGA_MIN_BLOCKS=0 -DHL_FINALIZE_MIN_BLOCKS=0 -DHL_PENALTY_MIN_BLOCKS=0",
            "-DHL_OMEGA_MIN_BLOCKS=2 -DHL_FINALIZE_MIN_BLOCKS=2 -DHL_PENALTY_MIN_BLOCKS=2"]
FAMILIES = {"omega": "HL_OMEGA_MIN_BLOCKS", "finalize": "HL_FINALIZE_MIN_BLOCKS", "penalty": "HL_PENALTY_MIN_BLOCKS"}


def child(dry_run: bool) -> Dict[str, float]:
    """Device milliseconds per call of each kernel family, in this process's variant."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    scripts = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(scripts))
    sys.path.insert(0, str(scripts.parent / "tests"))
    import gpu_check

    from hlora import _native

    from conftest import make_step

    device = "cpu" if dry_run else "cuda"
    if dry_run:
        import cuda_emulator

        _native.set_cpu_path("cuda-emulator", emulator=str(cuda_emulator.build(Path("target/cuda_emulator"))))
    shapes, layers = gpu_check.MODELS["tiny (dry run)" if dry_run else "LLaMA-3.2-3B"]
    steps = [make_step(o, i, 8, torch.bfloat16, seed=k, device=device) for k, (o, i) in enumerate(shapes * layers)]
    cases = {c[0]: c[1] for c in gpu_check.op_cases(steps, 8)}
    calls = {"omega": cases["ω update"], "finalize": cases["Ω finalize (+ norms)"], "penalty": cases["penalty fwd+bwd"]}
    times: Dict[str, float] = {}
    for family, fn in calls.items():
        fn()  # compile, warm up
        acts = [ProfilerActivity.CPU] + ([] if dry_run else [ProfilerActivity.CUDA])
        with profile(activities=acts) as prof:
            for _ in range(5):
                fn()
            if not dry_run:
                torch.cuda.synchronize()
        ours = [e for e in prof.key_averages() if e.key.startswith(family + "_")]
        total = sum((e.self_cpu_time_total if dry_run else e.self_device_time_total) for e in ours)
        times[family] = total / 5 / 1e3  # µs over 5 calls -> ms per call
    return times


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.dry_run)))
        return 0
    results = []
    for defines in VARIANTS:
        env = dict(os.environ, HLORA_CUDA_DEFINES=defines)
        cmd = [sys.executable, __file__, "--child"] + (["--dry-run"] if args.dry_run else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"variant [{defines}] failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        times = json.loads(done.stdout.strip().splitlines()[-1])
        results.append((defines, times))
        print(f"[{defines or 'ptxas default'}] " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()), flush=True)
    if not results:
        return 1
    best = []
    for family, macro in FAMILIES.items():
        defines, _ = min(results, key=lambda r: r[1][family])  # the first (the defaults) on a tie
        best += [w for w in defines.split() if w.startswith(f"-D{macro}=")]
    print("fastest: HLORA_CUDA_DEFINES=" + json.dumps(" ".join(best)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
