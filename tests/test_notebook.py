"""The walkthrough notebook runs top to bottom on the real model (CI scale), so it cannot rot."""

from __future__ import annotations

import os
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "hlora_walkthrough.ipynb")


@pytest.mark.slow
def test_walkthrough_notebook_executes(tmp_path, monkeypatch):
    path = tmp_path / "walkthrough.ipynb"
    shutil.copy(NOTEBOOK, path)
    nb = nbformat.read(str(path), as_version=4)
    monkeypatch.setenv("HLORA_NOTEBOOK_SCALE", "ci")
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    text = "".join(o.get("text", "") for o in outputs) + "".join(
        o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "HLoRA" in text and "steps recorded" in text
    assert (tmp_path / "walkthrough_heatmap.png").stat().st_size > 1000
