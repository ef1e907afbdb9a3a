"""The Colab quickstart notebook runs headless, top to bottom, on offline data."""

import os

import pytest

from tests.helpers import require, require_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_quickstart.ipynb")


@pytest.mark.slow
def test_colab_quickstart_runs(tmp_path, monkeypatch):
    require_fashion_mnist()  # else the notebook would download it
    monkeypatch.setenv("ALEXNET_TF_NOTEBOOK_QUICK", "1")  # a few steps instead of epochs
    monkeypatch.setenv("PYTHONPATH", ROOT)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    notebook = require("nbformat").read(NOTEBOOK, as_version=4)
    require("nbclient").NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}}).execute()

    text = "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for output in cell.get("outputs", []))
    assert "test top-1 accuracy" in text
    assert text.count("predicted ") == 5
    assert os.path.exists(tmp_path / "exports" / "alexnet" / "1" / "saved_model.pb")
    assert os.path.exists(tmp_path / "curves.png")
    images = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert len(images) == 2  # the filter/augmentation figure and the curves
