"""Everything the library hands a user works when the model is on a GPU (issue #30).

There is no GPU here: ``fake_cuda.FakeCuda`` makes the model's tensors behave as CUDA tensors do
(``.numpy()`` and ``np.asarray`` refuse them until ``.cpu()``; mixing them with CPU tensors fails).
The views, widgets, results, traces and sessions the notebooks use run under it, by running the
tests of ``test_explore`` and ``test_widgets`` again on a model marked as being on the GPU.
``tests/test_notebook_families.py`` runs every notebook the same way.
"""

import inspect

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import test_explore  # noqa: E402
import test_widgets  # noqa: E402
import torch  # noqa: E402
from fake_cuda import NUMPY_ERROR, FakeCuda, is_fake_cuda  # noqa: E402

import iseg  # noqa: E402
from iseg.course.widgets import PromptWidget  # noqa: E402
from iseg.shapes import SPLITS, sample  # noqa: E402


@pytest.fixture(scope="module")
def gpu_model():
    model = iseg.load_model("shapes", device="cpu", verbose=False)
    return FakeCuda.put_on_fake_cuda(model)


def test_the_emulation_refuses_what_cuda_refuses(gpu_model):
    with FakeCuda():
        w = gpu_model.unet.conv_in.weight
        assert w.device == torch.device("cuda", 0) and w.is_cuda and gpu_model.device.type == "cuda"
        y = w.detach() * 2
        with pytest.raises(TypeError, match="can't convert cuda:0"):
            y.numpy()
        with pytest.raises(TypeError, match="can't convert cuda:0"):
            np.asarray(y)
        with pytest.raises(RuntimeError, match="same device"):
            y + torch.ones(y.shape)
        assert y.cpu().numpy().shape == tuple(y.shape)  # moved: fine
        assert np.asarray(y.to("cpu")).shape == tuple(y.shape)
        assert isinstance(y.sum().item(), float) and len(y.tolist()) == y.shape[0]  # as on CUDA
        assert is_fake_cuda(torch.zeros(3, device=y.device)) and is_fake_cuda(torch.ones(2).to("cuda"))
        assert (y + torch.tensor(1.0)).shape == y.shape  # a CPU scalar may join, as in torch
    assert NUMPY_ERROR.startswith("can't convert cuda:0")


def test_step_functions_return_device_tensors_and_results_are_numpy(gpu_model):
    with FakeCuda():
        seg = iseg.ISeg(gpu_model)
        s = sample(SPLITS["test"].start + 8)
        pixels = torch.from_numpy(np.asarray(s.image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        z0 = seg.forward.encode(pixels)
        z_t, t = seg.forward.noisy(z0, seg.settings.seed, seg.settings.timestep)
        assert is_fake_cuda(z0) and is_fake_cuda(z_t)
        with pytest.raises(TypeError):
            z0[0, 0].numpy()  # what notebook 01 did: it must call .cpu() first
        assert seg.forward.decode_latents(z_t).numpy().shape == (1, 3, 64, 64)  # for plotting: on the CPU
        result = seg.segment(s.image, list(s.classes))
        for array in (result.labels, result.maps, result.initial, result.scores(), result.labels_at(0)):
            assert isinstance(array, np.ndarray)
        np.asarray(result.overlay())
        result.show()
        trace = seg.trace(s.image, list(s.classes), kind="cross")
        name = trace.layers("cross")[0].name
        assert trace.class_map(name, s.classes[0]).shape[0] > 0
        session = seg.prompt_session(s.image)
        r = session.segment(points=[(20, 20)])
        assert isinstance(r.mask, np.ndarray) and isinstance(r.maps, np.ndarray)
        assert isinstance(seg.segment_prompt(s.image, text=s.classes[0]).mask, np.ndarray)
        # exact masks come from the CPU; the attention they are compared with lives on the GPU
        from iseg.masks import pool_labels
        from iseg.refine import entropy_reduce, mass_inside

        obs = seg.observe(s.image, list(s.classes))[0]
        P = entropy_reduce(obs.self_attention, 100.0)
        groups = pool_labels(s.mask, obs.grid).reshape(-1)
        inside = mass_inside(P, groups, 3)
        assert is_fake_cuda(inside) and inside.cpu().numpy().shape == (3, obs.grid**2)
        # open vocabulary: the label evidence compares numpy labels with attention on the GPU
        from iseg.shapes import CLASSES

        assert isinstance(seg.segment(s.image, vocabulary=list(CLASSES)).labels, np.ndarray)


def _explore_tests():
    return [name for name, fn in vars(test_explore).items() if name.startswith("test_") and callable(fn)]


@pytest.mark.parametrize("name", _explore_tests())
def test_explore_views_on_the_gpu(gpu_model, name):
    fn = getattr(test_explore, name)
    args = {"seg": lambda: iseg.ISeg(gpu_model), "shape": lambda: sample(SPLITS["test"].start + 2)}
    with FakeCuda():
        fn(**{p: args[p]() for p in inspect.signature(fn).parameters})


@pytest.mark.parametrize("name", [n for n in vars(test_widgets) if n.startswith("test_")])
def test_prompt_widget_on_the_gpu(gpu_model, name):
    fn = getattr(test_widgets, name)
    with FakeCuda():
        s = next(sample(seed) for seed in range(100) if len(sample(seed).classes) >= 2)
        widget = PromptWidget(iseg.ISeg(gpu_model), s.image)
        widget.sample = s
        args = {"widget": widget, "shapes_pipe": gpu_model}
        fn(**{p: args[p] for p in inspect.signature(fn).parameters})
