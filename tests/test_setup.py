"""The README's set-up: what `make` does before it installs anything and when it rebuilds, and the
wheel pip builds for an existing environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import pinned_versions

ROOT = Path(__file__).resolve().parent.parent


def test_install_stops_with_one_clear_line_when_the_disk_is_too_full(tmp_path: Path) -> None:
    # A copy of what the deps step reads, asked to need more space than any disk has: it must
    # stop before creating .venv (not halfway through pip with an OSError).
    for name in ("Makefile", "pyproject.toml", "scripts/deps.py", "scripts/constraints.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    done = subprocess.run(["make", "deps", "MIN_FREE_MB=999999999"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "installing .venv needs ~999999999 MB free" in done.stderr
    assert "MB left" in done.stderr
    assert not (tmp_path / ".venv").exists()


def test_editing_any_rust_source_rebuilds_the_extension(tmp_path: Path) -> None:
    # A stale extension would let `make test` pass on code it never compiled: a change to any file
    # the crate is built from — in a subfolder of src/ too — must make `make build` run maturin.
    crate = sorted(p.relative_to(ROOT) for p in (ROOT / "src").rglob("*") if p.is_file())
    assert any(len(p.parts) > 2 for p in crate), "expected modules in subfolders of src/"
    sources = [*crate, Path("Cargo.toml"), Path("Cargo.lock"), Path(".cargo/config.toml")]
    for name in [Path("Makefile"), Path("pyproject.toml"), Path("scripts/deps.py"), Path("scripts/constraints.txt"),
                 *sources]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".venv").mkdir()
    built = 2_000_000_000  # the stamps are newer than every copied input...
    for path in tmp_path.rglob("*"):
        if path.is_file():
            os.utime(path, (built - 100, built - 100))
    for stamp in (".deps-installed", ".native-built"):
        (tmp_path / ".venv" / stamp).touch()
        os.utime(tmp_path / ".venv" / stamp, (built, built))

    def plan() -> str:
        done = subprocess.run(["make", "-n", "build"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "maturin" not in plan()  # ...so nothing is rebuilt,
    for name in sources:  # until one source is edited after the build.
        os.utime(tmp_path / name, (built + 100, built + 100))
        assert "maturin develop" in plan(), f"editing {name} does not rebuild the extension"
        os.utime(tmp_path / name, (built - 100, built - 100))


def test_the_lock_pins_every_requirement_within_its_range() -> None:
    # `make` installs with --constraint scripts/constraints.txt. A requirement it does not pin would
    # float to whatever PyPI has that day (a clean clone's CI could turn red on a release); a pin
    # outside pyproject.toml's range would make pip fail, or test a version users cannot install.
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {name: version for name, (version,) in pinned_versions(ROOT / "scripts" / "constraints.txt").items()}
    listed = subprocess.run([sys.executable, str(ROOT / "scripts" / "deps.py"), "runtime", "hf", "experiments", "test"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert "torch==2.11.0" not in listed  # a floor for users...
    assert pins["torch"] == "2.11.0"  # ...and .venv the torch the tch provider is built against (make)
    for wanted in (Requirement(spec) for spec in [*listed, "pip"]):
        pinned = pins.get(canonicalize_name(wanted.name))
        assert pinned is not None, f"{wanted.name} is not in scripts/constraints.txt (run `make lock`)"
        assert wanted.specifier.contains(pinned, prereleases=True), \
            f"scripts/constraints.txt pins {wanted.name}=={pinned}, outside pyproject.toml's {wanted}"


@pytest.mark.slow
def test_pip_builds_a_wheel_that_works_outside_the_source_tree(tmp_path: Path) -> None:
    # The build behind `pip install --no-build-isolation ./hlora`: pip's PEP 517 build in an
    # activated environment with torch 2.11.0, where the build backend adds the tch provider, with
    # no LIBTORCH_USE_PYTORCH exported (it sets it). It reuses the suite's Rust build in target/.
    env = {k: v for k, v in os.environ.items() if k not in ("LIBTORCH_USE_PYTORCH", "PYTHONPATH")}
    env.update(VIRTUAL_ENV=sys.prefix, PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               CARGO_TARGET_DIR=env.get("CARGO_TARGET_DIR", str(ROOT / "target")))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
                            "-w", str(tmp_path / "dist"), str(ROOT)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stderr[-3000:]
    said = "hlora: compiling the tch and view providers (torch 2.11.0 in the build environment)"
    assert said in built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("hlora-*.whl")
    assert "-abi3-" in wheel.name  # one wheel for every Python that torch 2.11.0 runs on
    with zipfile.ZipFile(wheel) as zipped:
        names = set(zipped.namelist())
    for needed in ("hlora/_native.abi3.so", "hlora/_native.pyi", "hlora/py.typed",
                   "hlora/experiments/data/files/MANIFEST.json"):
        assert needed in names, f"{needed} is missing from {wheel.name}"

    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                                str(wheel)], env=env, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    # From elsewhere, with the installed copy first on the path: the wheel's own extension must load
    # (backend "rust", not the fallback) and agree with the reference.
    check = """
import hlora, torch
from hlora import ops, reference
assert hlora.__file__.startswith(SITE), hlora.__file__
assert hlora.backend() == "rust", hlora.backend()
assert hlora.backend_info()["providers"] == ["tch", "view"], hlora.backend_info()
g = torch.Generator().manual_seed(3)
omega = torch.rand(37, 29, generator=g, dtype=torch.float64)
a, b = torch.randn(5, 29, generator=g, dtype=torch.float64), torch.randn(37, 5, generator=g, dtype=torch.float64)
got = ops.importance_penalty(omega, a, b, scaling=2.0)
want = reference.importance_penalty(omega, a, b, scaling=2.0)
assert torch.allclose(got, want, rtol=1e-12, atol=0), (got, want)
print("ok", hlora.backend())
"""
    env.update(PYTHONPATH=str(site), HLORA_BACKEND="rust")
    ran = subprocess.run([sys.executable, "-c", f"SITE = {str(site)!r}\n" + check], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.split() == ["ok", "rust"]


def test_the_suite_runs_on_only_what_the_project_installs() -> None:
    # CI builds .venv on a clean machine from scripts/constraints.txt alone: a package installed
    # into .venv by hand (sentencepiece was one) lets the suite pass here and fail there.
    from importlib.metadata import distributions

    from packaging.utils import canonicalize_name

    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"the suite runs in {sys.prefix}, not the project's .venv")
    pins = {name: version for name, (version,) in pinned_versions(ROOT / "scripts" / "constraints.txt").items()}
    extra = []
    for dist in distributions(path=[p for p in sys.path if p.startswith(sys.prefix)]):
        name = canonicalize_name(dist.metadata["Name"])
        if name != "hlora" and pins.get(name) != dist.version:
            extra.append(f"{name}=={dist.version}" + (f" (pinned: {pins[name]})" if name in pins else ""))
    assert not extra, (f".venv holds what scripts/constraints.txt does not install: {', '.join(sorted(extra))}; "
                       "a step done by hand passes here and fails on a clean machine (`make clean && make test`)")
