"""Settings for every test run, unit tests and notebooks (nbval) alike."""

import os

# OpenMP threads that spin while they wait starve each other when a core is busy elsewhere (a
# notebook kernel's own threads, a second process): notebook cells ran 10x slower on 2 cores.
# Kernels started by nbval inherit the environment of this process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import pytest  # noqa: E402

# Notebooks under nbval run as on a GPU: their kernels start with tests/fake_cuda_site on PYTHONPATH
# and ISEG_FAKE_CUDA=1, so every model they load behaves as one on CUDA (tests/fake_cuda.py), and a
# cell that calls .numpy() on a GPU tensor fails here as it would there. ISEG_NOTEBOOK_FAKE_CUDA=0
# runs them on the plain CPU. Only nbval's kernels get these variables, not other subprocesses.
_FAKE_CUDA_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "fake_cuda_site")
_PLAIN_ENV = {k: os.environ.get(k) for k in ("PYTHONPATH", "ISEG_FAKE_CUDA")}


def _set_env(values):
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    notebook = type(item).__name__ == "IPyNbCell"  # nbval's cells: the kernel starts at the first one's setup
    if notebook and os.environ.get("ISEG_NOTEBOOK_FAKE_CUDA", "1") != "0":
        path = os.pathsep.join([_FAKE_CUDA_SITE] + ([_PLAIN_ENV["PYTHONPATH"]] if _PLAIN_ENV["PYTHONPATH"] else []))
        _set_env({"PYTHONPATH": path, "ISEG_FAKE_CUDA": "1"})
    else:
        _set_env(_PLAIN_ENV)
