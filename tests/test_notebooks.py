"""Every notebook in colab/ runs top to bottom, headless, on a tiny random checkpoint with the real vocabulary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

COLAB = Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))


@pytest.mark.quick
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


def install_cell(path: Path) -> str:
    """The notebook's first code cell: the one that installs gptoss_jax where it is missing."""
    return next(cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code")


@pytest.mark.quick
def test_every_notebook_installs_the_same_way_without_a_placeholder():
    cells = {install_cell(path) for path in NOTEBOOKS}
    assert len(cells) == 1
    assert "OWNER" not in cells.pop()


@pytest.mark.quick
def test_the_install_cell_says_what_to_do_when_there_is_nothing_to_install_from(tmp_path):
    # An interpreter without site-packages (-S) and without this folder on its path (-I) lacks gptoss_jax,
    # as a fresh Colab runtime does; there is no GPTOSS_JAX_SOURCE, wheel or clone to install from.
    env = {key: value for key, value in os.environ.items() if key != "GPTOSS_JAX_SOURCE"}
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", install_cell(NOTEBOOKS[0])], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "RuntimeError: gptoss_jax is not installed: set GPTOSS_JAX_SOURCE (e.g. git+https://github.com/<you>/gptoss_jax), "
        "upload a gptoss_jax-*.whl to /content, or clone the repository to /content/gptoss_jax"
    )
    # Given a source, it hands it to pip (a wheel that does not exist here, so pip fails and installs nothing).
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", install_cell(NOTEBOOKS[0])], capture_output=True, text=True, cwd=tmp_path,
        env={**env, "GPTOSS_JAX_SOURCE": str(tmp_path / "gptoss_jax-0.1.0-py3-none-any.whl")},
    )  # fmt: skip
    wheel = tmp_path / "gptoss_jax-0.1.0-py3-none-any.whl"
    assert result.returncode == 1 and f"Requirement '{wheel}'" in result.stderr and "CalledProcessError" in result.stderr
