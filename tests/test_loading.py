"""Loading: shipped models, local folders, and the error for weights that are not here."""

import os
import subprocess
import sys
import time

import pytest

import iseg
from iseg import ModelNotAvailableError
from iseg.loading import load_pipeline


def _check_ways_out(message: str, model: str):
    assert repr(model) in message
    assert "hf download" in message  # 1. download once
    assert "local folder" in message  # 2. a local folder
    assert "load_model('shapes')" in message  # 3. the shipped model


def test_missing_folder_names_the_model_and_three_ways_out(tmp_path):
    missing = str(tmp_path / "sd21")
    with pytest.raises(ModelNotAvailableError) as err:
        load_pipeline(missing)
    _check_ways_out(str(err.value), missing)
    assert "no such folder" in str(err.value)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_uncached_hub_id_offline_fails_fast_without_network():
    code = ("import iseg, time\n"
            "t = time.time()\n"
            "try:\n"
            "    iseg.loading.load_pipeline('iseg-tests/not-a-cached-model')\n"
            "except iseg.ModelNotAvailableError as e:\n"
            "    print('ERR', round(time.time() - t, 1)); print(e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=os.environ.get("HF_HOME", "/tmp/iseg-empty-hf-home"))
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert time.time() - start < 60
    assert out.stdout.startswith("ERR"), out.stderr[-2000:]
    _check_ways_out(out.stdout, "iseg-tests/not-a-cached-model")
    assert "HF_HUB_OFFLINE=1" in out.stdout
    assert "hf download iseg-tests/not-a-cached-model" in out.stdout


def test_shapes_is_shipped_and_auto_falls_back_to_it(capsys):
    assert "shapes" in iseg.shipped_models()
    pipe = load_pipeline("auto", device="cpu")
    assert pipe.name == "shapes" and pipe.preset == "shapes"
    assert "auto' -> shapes" in capsys.readouterr().out
    assert pipe.unet.dtype.is_floating_point and str(pipe.unet.dtype) == "torch.float32"


def test_auto_picks_the_shapes_mmdit_for_the_sd3_family(capsys):
    assert "shapes-mmdit" in iseg.shipped_models()
    model = iseg.load_model("auto", device="cpu", family="sd3")
    assert (model.name, model.family, model.preset) == ("shapes-mmdit", "sd3", "shapes-mmdit")
    assert "auto' -> shapes-mmdit (stabilityai/stable-diffusion-3-medium-diffusers needs" in capsys.readouterr().out
    assert type(model.pipe.transformer).__name__ == "SD3Transformer2DModel"
    # "shapes" stays the UNet; family only chooses for "auto"
    assert iseg.load_model("auto", device="cpu", family="sd", verbose=False).name == "shapes"
    with pytest.raises(ValueError, match="knows the families \\['sd', 'sd3'\\], not 'flux'"):
        iseg.load_model("auto", device="cpu", family="flux")
    with pytest.raises(ValueError, match="only chooses what load_model\\('auto'\\) loads"):
        iseg.load_model("shapes", device="cpu", family="sd3")
