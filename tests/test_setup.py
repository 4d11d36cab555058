"""The README's set-up commands: what `make` does before it installs anything."""

from __future__ import annotations

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
