"""The training-loop notebook runs top to bottom; its own assertions are the checks (loss
down, reward up, no recompiles after the first call, rollout logprobs equal to the
forward's), and it prints what it found."""

import os

import nbformat
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks",
                        "train_and_sample.ipynb")


def test_train_and_sample_notebook_executes():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    printed = "".join(output.get("text", "") for cell in notebook.cells
                      if cell.cell_type == "code" for output in cell.get("outputs", []))
    assert "no recompiles after the first evaluation" in printed
    assert "no recompiles after the first rollout" in printed
    assert "Quillon" in printed  # the fine-tuned fact, in an evaluation's greedy text
