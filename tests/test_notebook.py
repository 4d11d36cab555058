"""notebooks/exploring_importance.ipynb: committed with outputs that are current (its code is the
code that produced them, by the generator's stamp), and it runs top to bottom on the real model at
CI scale, so it cannot rot."""

from __future__ import annotations

import importlib.util

import nbformat
import pytest

import hlora

from conftest import REPO

PLOTS = 7  # per-layer norms, histogram, heatmap, coefficients, text A vs B, loss and penalty curves, fronts


def _maker():
    spec = importlib.util.spec_from_file_location("make_notebooks", REPO / "scripts" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs(nb) -> list:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def test_the_committed_notebook_shows_the_outputs_of_its_current_code() -> None:
    maker = _maker()
    committed = nbformat.read(maker.NOTEBOOK, as_version=4)
    stamp = committed.metadata.get("hlora", {})
    # Stale if a cell was edited after the run, or the generator's cells changed since.
    assert [c.source for c in committed.cells] == [c.source for c in maker.build().cells], \
        "notebook differs from scripts/make_notebooks.py: run python scripts/make_notebooks.py"
    assert stamp.get("code_sha256") == maker.code_hash(committed.cells), "outputs are stale: rerun the generator"
    assert stamp.get("version") == hlora.__version__
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # one run, top to bottom
    assert all(c.outputs for c in code[1:])  # all but the first (it only quiets two warnings)
    outputs = _outputs(committed)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    pngs = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == PLOTS and all(len(p) < 120_000 for p in pngs)  # inline and small


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom(tmp_path, monkeypatch) -> None:
    maker = _maker()
    nb = maker.build()
    monkeypatch.setenv("HLORA_NOTEBOOK_SCALE", "ci")
    monkeypatch.setenv("HLORA_FRONTS", str(REPO / "results" / "fronts"))  # it runs in tmp_path
    maker.execute(nb, str(tmp_path), timeout=900)
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == PLOTS
    text = "".join(o.get("text", "") for o in outputs)
    assert "steps recorded" in text and "median over matrices" in text and "perplexity rise" in text
    assert "top 1.0% of entries hold" in text
    assert "PPL rise at matched accuracy" in text and "HLoRA-layer: " in text
