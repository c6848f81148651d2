"""Every notebook in notebooks/ executes headless (nbclient) in its small setting.

The kernel is the `python3` kernelspec, which jupyter_client launches with this interpreter
(`sys.executable`), so it sees the same venv. `LONGCAT_NOTEBOOK_SMOKE=1` tells each notebook to use
its smallest setting (a few training steps, tiny configs).
"""

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {"model_anatomy.ipynb", "routing_explorer.ipynb", "generation.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{os.path.basename(path)} cell {i} has outputs: strip them before committing")


@pytest.fixture(scope="module")
def notebook_workdir(tmp_path_factory):
  """One directory for the module: the notebooks share the briefly trained model they train."""
  return tmp_path_factory.mktemp("notebooks")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, monkeypatch, notebook_workdir):
  monkeypatch.setenv("LONGCAT_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("LONGCAT_NOTEBOOK_WORKDIR", str(notebook_workdir))
  monkeypatch.delenv("LONGCAT_CHECKPOINT", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(path)}})
  client.execute()  # raises CellExecutionError naming the failing cell
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors
