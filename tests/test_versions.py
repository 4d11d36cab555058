"""The oldest versions pyproject.toml allows: users install hlora into existing pipelines, often on
transformers 4.x. `scripts/constraints-min.txt` pins those floors; the slow test installs them from
PyPI into a throwaway environment layered over .venv (torch and hlora come from .venv) and runs the
Hugging Face, importance-file and plot tests there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import pinned_versions

ROOT = Path(__file__).resolve().parent.parent
OLDEST = ROOT / "scripts" / "constraints-min.txt"
#: What runs there: the Trainer callbacks and mixin, the real model (read from GGUF), evaluation,
#: recording, importance files (safetensors) and the figures (matplotlib).
SUITE = ("tests/test_hf.py", "tests/test_smollm2.py", "tests/test_data_eval.py", "tests/test_recorder.py",
         "tests/test_regularizer.py", "tests/test_importance_files.py",
         "tests/test_pipeline.py::test_grid_summary_from_saved_runs")


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
    assert {"numpy", "transformers", "matplotlib"} <= set(floors)  # the parsing found them
    for name, floor in floors.items():
        assert name in pins, f"scripts/constraints-min.txt does not pin {name} (pyproject.toml: {name}>={floor})"
        oldest = min(map(Version, pins[name]))
        assert oldest.release[:len(floor.release)] == floor.release, \
            f"scripts/constraints-min.txt pins {name}=={oldest}, pyproject.toml's floor is {name}>={floor}"
    assert all(len(versions) == 1 for versions in pinned_versions(OLDEST).values()), \
        "one version of each for this Python"


@pytest.mark.slow
def test_hugging_face_tests_pass_on_the_oldest_allowed_versions(tmp_path: Path) -> None:
    oldest = tmp_path / "oldest"
    subprocess.run([sys.executable, "-m", "venv", str(oldest)], check=True, timeout=300)
    python = str(oldest / "bin" / "python")

    def site_packages(interpreter: str) -> str:
        return subprocess.run([interpreter, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()

    # After its own packages: .venv's (torch, hlora's editable install and its .pth files).
    Path(site_packages(python), "zz_hlora_venv.pth").write_text(
        f"import site; site.addsitedir({site_packages(sys.executable)!r})\n")
    installed = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                "-r", str(OLDEST)], capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stderr[-3000:]

    pins = {name: version for name, (version,) in pinned_versions(OLDEST).items()}
    seen = subprocess.run([python, "-c", "import importlib.metadata as m, sys; "
                           "print(' '.join(m.version(n) for n in sys.argv[1:]))", *pins],
                          capture_output=True, text=True, check=True).stdout.split()
    assert dict(zip(pins, seen)) == pins  # the overlay's own versions win over .venv's

    env = {**os.environ, "HLORA_BACKEND": "rust", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    ran = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITE], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    summary = ran.stdout.strip().splitlines()[-1] if ran.stdout.strip() else ""
    assert ran.returncode == 0 and " passed" in summary and "failed" not in summary, \
        ran.stdout[-5000:] + ran.stderr[-2000:]
