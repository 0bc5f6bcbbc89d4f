import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def tokenizer():
    import tiny

    return tiny.clip_tokenizer()


@pytest.fixture(scope="session")
def tiny_pipe():
    import tiny

    return tiny.tiny_pipeline(seed=0, sd_layout=True)


@pytest.fixture(scope="session")
def tiny_pipe_small():
    import tiny

    return tiny.tiny_pipeline(seed=1, sd_layout=False)


@pytest.fixture(scope="session")
def shapes_pipe():
    import iseg

    return iseg.loading.load_pipeline("shapes", device="cpu", verbose=False)
