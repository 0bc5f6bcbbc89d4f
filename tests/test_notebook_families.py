"""Every notebook on every model family, on a fake GPU (issue #30).

MODEL is set to a folder of a tiny random-weight pipeline of each family (SD 1.x/2.x, SDXL, SD3,
FLUX; built from ``tests/tiny.py`` and saved with ``save_pretrained``, loaded at the size they were
built for: ``family_models.install_tiny_sizes``) and to the two shipped models, ``shapes`` (the
UNet, what MODEL = "auto" gives here, where the browser tests do not run it) and ``shapes-mmdit``;
each notebook runs headless (``tests/notebook_runner.py``) in a kernel whose models behave as CUDA ones
(``tests/fake_cuda.py``), and must end with no error output. Each notebook runs in one kernel for
every model in turn (its namespace reset between them); each notebook is one test, so that
``make test``'s two processes share them; each run's time is printed at the end of the run.
``ISEG_EXECUTED_NOTEBOOKS=DIR`` keeps the
executed notebooks (``NAME--FAMILY.ipynb``); ``ISEG_FAMILIES=sd,flux`` and
``ISEG_NOTEBOOKS=00_quickstart,07_interactive`` run subsets.

The shapes UNet also runs under nbval in the main suite: on the fake GPU too, except when
ISEG_EXECUTED_NOTEBOOKS is set (``conftest.py``: the website's notebooks run on the plain CPU);
the browser tests run every notebook with it on the fake GPU either way, and where they cannot run
(no Chromium, outside CI) this matrix does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser import browser_tests_run
from family_models import BUILDERS, install_tiny_sizes, save_family_models

import iseg
import iseg.loading as loading

ROOT = Path(__file__).resolve().parents[1]
# ISEG_NOTEBOOKS=00_quickstart,07_interactive runs a subset
NOTEBOOKS = [p for p in sorted((ROOT / "notebooks").glob("*.ipynb"))
             if not os.environ.get("ISEG_NOTEBOOKS") or p.stem in os.environ["ISEG_NOTEBOOKS"].split(",")]
# The shapes UNet on the fake GPU: the browser tests Run All every notebook with it in JupyterLab, on
# the fake GPU (tests/test_notebooks_in_browser.py), so this matrix runs it only where they do not run
# (no Chromium, outside CI), or when ISEG_FAMILIES names it
SHIPPED = ["shapes-mmdit"] if browser_tests_run() and "shapes" not in os.environ.get("ISEG_FAMILIES", "").split(",") \
    else ["shapes", "shapes-mmdit"]
FAMILIES = [*BUILDERS, *SHIPPED]


def test_the_runner_sets_the_model_knob_only():
    import nbformat
    from notebook_runner import set_model

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("MODEL = 'not code'"),
        nbformat.v4.new_code_cell('x = 1\nMODEL = "auto"   # the knob\nprint(MODEL)\nMODEL = "again"'),
        nbformat.v4.new_code_cell('MODEL = "later"')])
    assert set_model(nb, "/tmp/a folder/tiny-sd3")
    assert nb.cells[0].source == "MODEL = 'not code'"
    assert nb.cells[1].source.splitlines()[1].startswith("MODEL = '/tmp/a folder/tiny-sd3'")
    assert nb.cells[1].source.splitlines()[3] == 'MODEL = "again"' and nb.cells[2].source == 'MODEL = "later"'
    assert not set_model(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), "m")


def test_a_tiny_flux_folder_loads_at_the_size_it_was_built_for(tmp_path, monkeypatch):
    folder = save_family_models(tmp_path, ["flux"])["flux"]
    assert iseg.ISeg(iseg.load_model(str(folder))).plan().image_size == 256   # FluxPipeline: 128 latent cells on load
    monkeypatch.setattr(loading, "_finish", loading._finish)   # undone after the test
    install_tiny_sizes()
    assert iseg.ISeg(iseg.load_model(str(folder))).plan().image_size == 32    # as tests/tiny.py built it
    assert iseg.ISeg(iseg.load_model("shapes")).plan().image_size == 64       # no file: untouched


def test_nbval_runs_on_the_plain_cpu_when_its_notebooks_become_the_website(monkeypatch):
    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    settings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(settings)
    monkeypatch.delenv("ISEG_NOTEBOOK_FAKE_CUDA", raising=False)
    monkeypatch.delenv("ISEG_EXECUTED_NOTEBOOKS", raising=False)
    assert settings.nbval_on_fake_cuda()                 # a plain `make test`: the fake GPU
    monkeypatch.setenv("ISEG_EXECUTED_NOTEBOOKS", "/tmp/executed")
    assert not settings.nbval_on_fake_cuda()             # CI: the website's notebooks print "device: cpu"
    monkeypatch.setenv("ISEG_NOTEBOOK_FAKE_CUDA", "1")
    assert settings.nbval_on_fake_cuda()                 # asked for explicitly
    monkeypatch.delenv("ISEG_EXECUTED_NOTEBOOKS")
    monkeypatch.setenv("ISEG_NOTEBOOK_FAKE_CUDA", "0")
    assert not settings.nbval_on_fake_cuda()
    # ... and the shapes UNet runs on the fake GPU in the browser tests, or else in this matrix
    assert browser_tests_run() or "shapes" in FAMILIES


def _selected():
    chosen = os.environ.get("ISEG_FAMILIES")
    return [f for f in FAMILIES if not chosen or f in chosen.split(",")]


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    folders = save_family_models(tmp_path_factory.mktemp("families"), [f for f in BUILDERS if f in _selected()])
    shipped = {name: name for name in SHIPPED if name in _selected()}
    return {**{tag: str(path) for tag, path in folders.items()}, **shipped}


def _run(notebook: Path, models: dict[str, str]) -> list[dict]:
    """Every family on one notebook, in one kernel (``notebook_runner.run_models``)."""
    cmd = [sys.executable, str(ROOT / "tests" / "notebook_runner.py"), str(notebook), "--models", json.dumps(models),
           "--fake-cuda", "--timeout", "300"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800,
                         env=dict(os.environ, ISEG_TINY_SIZES="1"))  # family_models.install_tiny_sizes
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    done = {r["tag"] for r in reports}
    return reports + [dict(notebook=notebook.stem, tag=tag, seconds=None, has_model_knob=None, first_cell_stderr=[],
                           errors=[dict(cell=None, ename="runner failed", evalue=out.stderr[-3000:])])
                      for tag in models if tag not in done]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_runs_on_every_family(model_folders, notebook, record_property):
    t0 = time.perf_counter()
    reports = _run(notebook, model_folders)
    print(f"\n{notebook.stem} on {len(model_folders)} models in {time.perf_counter() - t0:.0f} s")
    for r in reports:
        print(f"  [{r['tag']}]: {r['seconds']} s, {len(r['errors'])} error output(s)")
    # printed at the end of the run by conftest.py, also from xdist's processes
    record_property("notebook_runs", [(r["notebook"], r["tag"], r["seconds"], len(r["errors"])) for r in reports])
    failed = {r["tag"]: [(e["cell"], e["ename"], e["evalue"][:300]) for e in r["errors"]] for r in reports if r["errors"]}
    red = {r["tag"]: r["first_cell_stderr"] for r in reports if r.get("first_cell_stderr")}
    assert all(r.get("has_model_knob") is not False for r in reports), f"{notebook.stem} has no MODEL knob"
    assert not failed, f"{notebook.stem}, error outputs: {json.dumps(failed, indent=1)}"
    assert not red, f"{notebook.stem}: the first cell writes to stderr (a red box in JupyterLab): {red}"
