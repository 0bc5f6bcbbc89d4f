"""Settings for every test run, unit tests and notebooks (nbval) alike."""

import importlib.util
import os
from pathlib import Path

import pytest

# OpenMP threads that spin while they wait starve each other when a core is busy elsewhere (a
# notebook kernel's own threads, a second process): notebook cells ran 10x slower on 2 cores.
# Kernels started by nbval inherit the environment of this process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

# Notebooks under nbval run as on a GPU: their kernels start with tests/fake_cuda_site on PYTHONPATH
# and ISEG_FAKE_CUDA=1, so every model they load behaves as one on CUDA (tests/fake_cuda.py), and a
# cell that calls .numpy() on a GPU tensor fails here as it would there. ISEG_NOTEBOOK_FAKE_CUDA=0
# runs them on the plain CPU, and so does ISEG_EXECUTED_NOTEBOOKS=DIR (the website is built from
# those notebooks, whose cells print the model's device: a learner reading them runs on a CPU);
# then tests/test_notebook_families.py proves the shapes UNet on the fake GPU, as it does every
# other model. Only nbval's kernels get these variables, not other subprocesses.
_FAKE_CUDA_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "fake_cuda_site")
_PLAIN_ENV = {k: os.environ.get(k) for k in ("PYTHONPATH", "ISEG_FAKE_CUDA")}


def _set_env(values):
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def nbval_on_fake_cuda() -> bool:
    """Whether nbval's notebook kernels run on the fake GPU (see above)."""
    default = "0" if os.environ.get("ISEG_EXECUTED_NOTEBOOKS") else "1"
    return os.environ.get("ISEG_NOTEBOOK_FAKE_CUDA", default) != "0"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    notebook = type(item).__name__ == "IPyNbCell"  # nbval's cells: the kernel starts at the first one's setup
    if notebook and nbval_on_fake_cuda():
        path = os.pathsep.join([_FAKE_CUDA_SITE] + ([_PLAIN_ENV["PYTHONPATH"]] if _PLAIN_ENV["PYTHONPATH"] else []))
        _set_env({"PYTHONPATH": path, "ISEG_FAKE_CUDA": "1"})
    else:
        _set_env(_PLAIN_ENV)


# ISEG_EXECUTED_NOTEBOOKS=<folder>: every notebook that nbval ran without a failing cell is written
# there with its outputs (nbval itself keeps none), with its run time and the kernel's peak memory,
# so that `make docs` builds the website from this test run instead of executing the notebooks again.
_executed = {}  # notebook path -> {"failed": bool, "seconds": float, "peak_rss_mb": float | None}


def _kernel_peak_rss_mb(nb_file):
    """The notebook kernel's peak resident memory (Linux /proc), or None where it cannot be read."""
    try:
        pid = nb_file.kernel.km.provisioner.process.pid
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (AttributeError, OSError, ValueError):
        return None
    return None


def pytest_runtest_makereport(item, call):
    if not hasattr(item, "test_outputs"):
        return
    state = _executed.setdefault(item.parent.path, {"failed": False, "seconds": 0.0, "peak_rss_mb": None})
    state["seconds"] += call.duration  # saved with the executed notebook (below)
    if not os.environ.get("ISEG_EXECUTED_NOTEBOOKS"):
        return
    if call.excinfo is not None and not call.excinfo.errisinstance(pytest.skip.Exception):
        state["failed"] = True
    if call.when == "call":
        item.cell.outputs = list(item.test_outputs or [])
        item.cell.execution_count = item.cell_num + 1
        for out in item.cell.outputs:
            if out.output_type == "execute_result":
                out.execution_count = item.cell.execution_count
        state["peak_rss_mb"] = _kernel_peak_rss_mb(item.parent) or state["peak_rss_mb"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    folder = os.environ.get("ISEG_EXECUTED_NOTEBOOKS")
    last = nextitem is None or getattr(nextitem, "parent", None) is not item.parent
    if folder and hasattr(item, "test_outputs") and last:
        state = _executed.get(item.parent.path, {})
        if not state.get("failed", True):
            import nbformat

            nb = item.parent.nb
            nb.metadata.pop("widgets", None)
            nb.metadata["iseg_run"] = {"executed_by": "pytest --nbval", "seconds": round(state["seconds"], 1),
                                       "peak_rss_mb": None if state["peak_rss_mb"] is None else round(state["peak_rss_mb"])}
            Path(folder).mkdir(parents=True, exist_ok=True)
            nbformat.validate(nb)
            nbformat.write(nb, str(Path(folder) / item.parent.path.name))
    yield


# `make test` runs the suite in two processes (pytest-xdist). Each notebook's cells share one kernel
# and must run in order in one process, so a notebook is one unit of work; every other test is its
# own. The longest tests go first (`--no-loadscope-reorder` keeps this order), so that no process is
# left with a long one at the end while the other idles.
_FIRST = ("tests/test_notebook_families.py::test_every_notebook_runs_on_every_family",
          "tests/test_notebooks_in_browser.py::test_notebook_runs",
          "tests/test_eval.py::test_shapes_evaluation_reproduces_the_model_card",
          "tests/test_shapes_mmdit.py::test_what_the_mmdit_does_on_50_test_images",
          "tests/test_eval.py::test_two_processes_give_exactly_the_numbers_of_one",
          "tests/test_app.py", "tests/test_shapes.py::test_training_script_writes_a_loadable_folder")


def _rank(item) -> int:
    return next((i for i, prefix in enumerate(_FIRST) if item.nodeid.startswith(prefix)), len(_FIRST))


def pytest_collection_modifyitems(config, items):
    items.sort(key=_rank)  # stable: the order within each rank is kept, and so is each notebook's


if importlib.util.find_spec("xdist") is not None:  # (a hook pytest only knows with xdist installed)
    def pytest_xdist_make_scheduler(config, log):
        from xdist.scheduler import LoadScopeScheduling

        class NotebookScheduling(LoadScopeScheduling):
            """xdist's scope scheduling, where a scope is a notebook or else one test (xdist's own
            `--dist loadgroup` cannot group nbval's cells under pytest 9, which ignores the ids it sets)."""

            def _split_scope(self, nodeid: str) -> str:
                path = nodeid.split("::")[0]
                return path if path.endswith(".ipynb") else nodeid

        return NotebookScheduling(config, log)


NOTEBOOK_SECONDS = 60  # the course's promise: every notebook runs in under a minute on a 2-core CPU
_notebook_seconds = {}  # notebook file name -> nbval seconds, summed from the reports (also those of xdist's processes)
_family_runs = []  # (notebook, model, seconds, errors) of tests/test_notebook_families.py


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        name = Path(path).name
        _notebook_seconds[name] = _notebook_seconds.get(name, 0.0) + report.duration
    for key, value in report.user_properties:
        if key == "notebook_runs" and report.when == "call":
            _family_runs.extend(value)


def pytest_terminal_summary(terminalreporter):
    """Each notebook's Run All time under nbval (kernel start and every cell), and which exceed the
    course's minute; the times are printed, not asserted, because a shared machine is noisy. Then
    the time of each notebook on each model of the family matrix."""
    if _notebook_seconds:
        terminalreporter.section("notebook run times (nbval)")
        for name, seconds in sorted(_notebook_seconds.items()):
            over = f"  OVER {NOTEBOOK_SECONDS} s" if seconds > NOTEBOOK_SECONDS else ""
            terminalreporter.write_line(f"{name}: {seconds:.1f} s{over}")
    if _family_runs:
        terminalreporter.section("every notebook on every model (tests/test_notebook_families.py), seconds")
        for notebook, tag, seconds, errors in sorted(_family_runs):
            shown = "-" if seconds is None else f"{seconds:.1f}"
            terminalreporter.write_line(f"{notebook} [{tag}]: {shown}" + (f", {errors} error output(s)" if errors else ""))

