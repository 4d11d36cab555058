"""Builds the CPU emulator of the CUDA kernels (src/cuda/emulator.cpp, which includes
kernels.cu) as a shared library, for `_native.set_cpu_path("cuda-emulator", emulator=...)`.

    python scripts/cuda_emulator.py OUT_DIR
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "src" / "cuda" / "emulator.cpp"


def build(folder: Path) -> Path:
    """Compiles the emulator into `folder` with the native module's table sizes, so a layout drift
    between kernels.cu and src/cuda/tables.rs fails here as it would under NVRTC."""
    from hlora import _native

    compiler = shutil.which("g++")
    if compiler is None:  # the Rust build (torch-sys) needs g++ too, so a build machine has it
        raise RuntimeError("g++ is needed to build the CUDA kernel emulator")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "hlora_cuda_emulator.so"
    cmd = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
           *_native.cuda_size_defines(), "-o", str(target), str(SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the emulator failed:\n{done.stderr}")
    return target


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "target/cuda_emulator")))
