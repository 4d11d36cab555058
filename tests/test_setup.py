"""The README's set-up commands: what `make` does before it installs anything."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_install_stops_with_one_clear_line_when_the_disk_is_too_full(tmp_path: Path) -> None:
    # A copy of what the deps step reads, asked to need more space than any disk has: it must
    # stop before creating .venv (not halfway through pip with an OSError).
    for name in ("Makefile", "pyproject.toml", "scripts/deps.py"):
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
    sources = sorted(p.relative_to(ROOT) for p in (ROOT / "src").rglob("*") if p.is_file())
    assert any(len(p.parts) > 2 for p in sources), "expected modules in subfolders of src/"
    for name in [Path("Makefile"), Path("pyproject.toml"), Path("scripts/deps.py"), Path("Cargo.toml"),
                 Path("Cargo.lock"), *sources]:
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
