"""Put this folder on PYTHONPATH with ISEG_FAKE_CUDA=1 to run a process, e.g. a notebook kernel, as
if every model ``iseg.load_model`` returns were on a GPU (see ``tests/fake_cuda.py``). Tests only."""

import os

if os.environ.get("ISEG_FAKE_CUDA") == "1":
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fake_cuda.py")
    spec = importlib.util.spec_from_file_location("fake_cuda", path)
    module = sys.modules["fake_cuda"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.install()
