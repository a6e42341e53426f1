"""notebooks/quickstart.ipynb runs from top to bottom on the CPU and is stored without outputs."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_notebook_is_stored_without_outputs():
    cells = json.load(open(NOTEBOOK))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_notebook_runs(monkeypatch):
    """Every code cell, in order, in one namespace (what a kernel does), with figures closed
    instead of shown; no Jupyter needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(plt, "show", lambda *a, **k: plt.close("all"))
    namespace = {"__name__": "__main__"}
    for cell in json.load(open(NOTEBOOK))["cells"]:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            try:
                exec(compile(source, NOTEBOOK, "exec"), namespace)
            except Exception as e:  # noqa: BLE001 - name the cell that failed
                pytest.fail(f"cell failed: {type(e).__name__}: {e}\n{source}")
    assert namespace["morph"].samples.shape == (9, 28, 28, 1)
