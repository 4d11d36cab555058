"""Prints the pip requirements of the named groups from pyproject.toml (one source of truth).

    python scripts/deps.py runtime hf experiments test
"""

import sys
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
groups = sys.argv[1:] or ["runtime"]
deps: list = []
for group in groups:
    deps += project["dependencies"] if group == "runtime" else project["optional-dependencies"][group]
deps += ["maturin>=1.5,<2"]
print("\n".join(dict.fromkeys(deps)))
