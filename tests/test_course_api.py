"""The library API the notebooks are written against, for every family (issue #30)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import iseg

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mmdit():
    return iseg.load_model("shapes-mmdit", device="cpu", verbose=False)


def _ddpm_weights(config, t: int) -> tuple[float, float]:
    # SD's scaled-linear schedule written out in float64, independent of diffusers
    betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps) ** 2
    abar = np.cumprod(1 - betas)[t]
    return math.sqrt(abar), math.sqrt(1 - abar)


def test_noise_weights_follow_each_family_schedule(shapes_pipe, mmdit):
    seg = iseg.ISeg(shapes_pipe, timestep=250)
    assert shapes_pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert seg.backbone.noise_weights(seg.settings.timestep) == pytest.approx(_ddpm_weights(shapes_pipe.scheduler.config, 250), abs=1e-5)
    seg_mmdit = iseg.ISeg(mmdit, timestep=250)
    assert seg_mmdit.backbone.noise_weights(seg_mmdit.settings.timestep) == pytest.approx((0.75, 0.25), abs=1e-6)


def test_step_functions_drive_any_denoiser(shapes_pipe, mmdit):
    import tiny

    for model in (shapes_pipe, mmdit, tiny.tiny_flux_pipeline()):
        seg = iseg.ISeg(model)
        size = seg.plan().image_size
        pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        z0 = seg.forward.encode(pixels)
        z_t, t = seg.forward.noisy(z0, seg.settings.seed, seg.settings.timestep)
        a, b = seg.backbone.noise_weights(seg.settings.timestep)
        picture = seg.forward.decode_latents(z0)
        assert picture.device.type == "cpu" and picture.shape == (1, 3, size, size)
        assert 0 <= float(picture.min()) and float(picture.max()) <= 1
        prompt = seg.prompt_for(["circle"] if seg.model.known_words else ["cat"])
        emb = seg.embedding(prompt, seg.settings.gamma)
        plan = seg.plan(z0.shape[-1])
        with iseg.capture_attention(seg.backbone.denoiser, plan.layers(), heads=dict(plan.heads)) as store:
            seg.forward.denoise(z_t, t, emb)
        cross = store.by_resolution("cross")
        # the step functions reproduce what segment reads, on every family
        obs = seg.observe(pixels[0].permute(1, 2, 0).numpy(), prompt.classes)[0]
        for r, m in cross.items():
            assert torch.allclose(m[0], obs.cross[r], atol=1e-5), (seg.model.name, r)
        assert seg.forward.attention_kind == ("separate" if seg.model.family in ("sd", "sdxl") else "joint")
        assert 0 < a < 1 and 0 < b < 1


def test_measured_and_raw_bg_power(shapes_pipe, mmdit):
    import tiny

    assert shapes_pipe.measured and mmdit.measured
    random_weights = iseg.LoadedModel.of(tiny.tiny_pipeline())
    assert not random_weights.measured and random_weights.raw_bg_power is None
    seg = iseg.ISeg(random_weights)
    assert seg.raw_bg_power == seg.settings.bg_power
    assert iseg.ISeg(shapes_pipe).raw_bg_power == shapes_pipe.raw_bg_power
    iseg.ISeg(random_weights, iterations=0, bg_power=seg.raw_bg_power)  # what notebook 08 does


def test_shapes_mmdit_generates_an_image(mmdit):
    model = mmdit
    assert model.vae.config.shift_factor == 0.0
    image = model("a red circle", num_inference_steps=2, height=64, width=64,
                  generator=torch.Generator().manual_seed(0)).images[0]
    arr = np.asarray(image)
    assert arr.shape == (64, 64, 3) and np.isfinite(arr).all() and arr.std() > 0


def test_loading_prints_no_stderr_and_the_version_matches_pyproject():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert iseg.__version__ == version
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env.pop("PYTHONWARNINGS", None)
    out = subprocess.run([sys.executable, "-c", "import iseg; iseg.load_model('auto', device='cpu'); "
                          "iseg.load_model('shapes-mmdit', device='cpu')"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", out.stderr  # a notebook shows anything here in a red box
    assert out.stdout.startswith("iseg: model 'auto' -> shapes")


def test_example_truth_is_the_exact_mask_in_the_examples_class_order(shapes_pipe, mmdit, tiny_pipe):
    from iseg.course.examples import example, example_truth
    from iseg.shapes import CLASSES, SPLITS, sample

    s = sample(SPLITS["test"].start + 8)
    for model in (shapes_pipe, mmdit):
        image, classes = example(model, 8)
        truth = example_truth(model, 8)
        assert truth.shape == s.mask.shape and sorted(np.unique(truth)) == list(range(len(classes) + 1))
        for k, name in enumerate(classes, start=1):   # label k is the k-th class, as in a result's labels
            np.testing.assert_array_equal(truth == k, s.mask == CLASSES.index(name) + 1)
    assert example_truth(tiny_pipe, 8) is None   # a photo: no exact mask


def test_example_ious_by_hand():
    from iseg.course.examples import example_ious

    truth = np.array([[0, 1, 1], [0, 2, 2], [0, 0, 2]])
    labels = np.array([[1, 1, 0], [0, 2, 2], [2, 2, 2]])
    # class 1: overlap 1 ({(0,1)}), union 3; class 2: overlap 3, union 5
    assert example_ious(labels, truth) == pytest.approx({1: 1 / 3, 2: 3 / 5})
    with pytest.raises(ValueError, match=r"differ in size"):
        example_ious(labels[:2], truth)


def test_the_prompt_widget_placeholder_names_a_photo_models_own_classes(tiny_pipe):
    import matplotlib

    matplotlib.use("Agg")
    from iseg.course.examples import example
    from iseg.course.widgets import PromptWidget

    w = PromptWidget(iseg.ISeg(tiny_pipe))
    assert w.text.placeholder == "; ".join(f"a {c}" for c in example(tiny_pipe, 0)[1][:2])
    assert "circle" not in w.text.placeholder
