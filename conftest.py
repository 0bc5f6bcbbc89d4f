"""Settings for every test run, unit tests and notebooks (nbval) alike."""

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
    state["seconds"] += call.duration  # every notebook's run time is printed at the end (below)
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


NOTEBOOK_SECONDS = 60  # the course's promise: every notebook runs in under a minute on a 2-core CPU


def pytest_terminal_summary(terminalreporter):
    """Each notebook's Run All time under nbval (kernel start and every cell), and which exceed the
    course's minute; the times are printed, not asserted, because a shared machine is noisy."""
    if not _executed:
        return
    terminalreporter.section("notebook run times (nbval)")
    for path, state in sorted(_executed.items()):
        over = f"  OVER {NOTEBOOK_SECONDS} s" if state["seconds"] > NOTEBOOK_SECONDS else ""
        terminalreporter.write_line(f"{Path(path).name}: {state['seconds']:.1f} s{over}")
