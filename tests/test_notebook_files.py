"""The notebooks are the source people edit: committed stripped, with stable cell ids."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MARK = "# NBVAL_CHECK_OUTPUT"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_has_stable_cell_ids(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    ids = [cell.get("id") for cell in nb.cells]
    assert all(ids) and len(set(ids)) == len(ids), f"{path.name}: every cell needs its own id"
    assert "widgets" not in nb.metadata, f"{path.name}: widget state is committed (run tools/strip_outputs.py)"
    checked = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert "execution" not in cell.metadata
        if cell.source.startswith(MARK):
            checked += 1
            assert cell.outputs, f"{path.name}: a {MARK} cell without its expected output"
            assert all(o.output_type == "stream" and o.name == "stdout" for o in cell.outputs)
        else:
            assert not cell.outputs, f"{path.name}: outputs committed (run tools/strip_outputs.py {path.stem})"
    assert checked >= 1, f"{path.name}: no cell checks its result (# NBVAL_CHECK_OUTPUT)"


def test_the_notebooks_have_no_generator():
    # edits made in JupyterLab are the source; nothing regenerates the notebooks over them
    assert not (Path(__file__).resolve().parents[1] / "tools" / "make_notebooks.py").exists()
