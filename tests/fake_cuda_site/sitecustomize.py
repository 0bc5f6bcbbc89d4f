"""Put this folder on PYTHONPATH with ISEG_FAKE_CUDA=1 to run a process, e.g. a notebook kernel, as
if every model ``iseg.load_model`` returns were on a GPU (see ``tests/fake_cuda.py``); with
ISEG_TINY_SIZES=1 too, the tiny pipelines of ``tests/family_models.py`` load at the size they were
built for (``install_tiny_sizes``). Tests only."""

import os

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("ISEG_FAKE_CUDA") == "1":
    import importlib.util
    import sys

    path = os.path.join(_TESTS, "fake_cuda.py")
    spec = importlib.util.spec_from_file_location("fake_cuda", path)
    module = sys.modules["fake_cuda"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.install()

if os.environ.get("ISEG_TINY_SIZES") == "1":
    import sys

    sys.path.append(_TESTS)  # family_models and tiny, after everything else on the path
    import family_models

    family_models.install_tiny_sizes()
