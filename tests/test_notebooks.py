"""Every notebook in colab/ runs top to bottom, headless, on a tiny random checkpoint with the real vocabulary."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

COLAB = Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))


def test_the_colab_folder_holds_the_notebooks():
    assert {"01_quickstart.ipynb", "02_finetune_rl.ipynb", "03_many_devices.ipynb"} <= {path.name for path in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_the_notebook_runs_to_the_end(path, harmony_checkpoint, harmony_vocab_dir, monkeypatch, tmp_path):
    # The kernel inherits this environment: the notebooks read GPTOSS_CHECKPOINT and GPTOSS_MAX_NEW_TOKENS
    # (random models rarely stop by themselves), harmony reads TIKTOKEN_ENCODINGS_BASE (see harmony_vocab_dir).
    monkeypatch.setenv("GPTOSS_CHECKPOINT", str(harmony_checkpoint))
    monkeypatch.setenv("GPTOSS_MAX_NEW_TOKENS", "24")
    # The RL notebook: a few steps of the toy reward a random model can learn (it never does arithmetic).
    monkeypatch.setenv("GPTOSS_RL_STEPS", "2")
    monkeypatch.setenv("GPTOSS_RL_TOY_REWARD", "1")
    notebook = nbformat.read(path, as_version=4)
    # One extra cell at the end says which interpreter ran the notebook: it must be this one.
    notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # a failing cell raises CellExecutionError, naming the cell and showing its traceback
    assert notebook.cells[-1].outputs[0]["text"].strip() == sys.executable
