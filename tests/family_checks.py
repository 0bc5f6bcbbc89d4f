"""Checks that every flow-matching family (SD3, FLUX) must pass in the same way; each family's
test module calls them on its own tiny pipeline."""

import torch

import iseg


def assert_flow_matching_noise(pipe, channels: int) -> None:
    """``z_t = (1 - s) z0 + s eps`` with ``s = t / 1000``, eps drawn from the settings' seed."""
    seg = iseg.ISeg(pipe, seed=3, timestep=250)
    z0 = torch.randn(2, channels, 16, 16, generator=torch.Generator().manual_seed(0))
    z_t, t = seg.forward.noisy(z0, seg.settings.seed, seg.settings.timestep)
    eps = torch.randn(channels, 16, 16, generator=torch.Generator("cpu").manual_seed(3))
    assert torch.equal(t, torch.tensor([250, 250]))
    assert torch.allclose(z_t, 0.75 * z0 + 0.25 * eps, atol=1e-6)


def assert_encode_inverts_decoding(pipe, channels: int) -> None:
    """``encode_images`` gives ``(mean - shift) * scale``, what the pipeline's decoding undoes."""
    seg = iseg.ISeg(pipe)
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vae = pipe.vae
    with torch.no_grad():
        mean = vae.encode(2 * pixels - 1).latent_dist.mean
        z0 = seg.forward.encode(pixels)
    assert z0.shape == (1, channels, 16, 16)
    assert torch.allclose(z0 / vae.config.scaling_factor + vae.config.shift_factor, mean, atol=1e-5)


def assert_segments_alike(seg, images, classes=("cat", "dog")):
    """Same inputs and seed give the same masks, and a batch gives what its images give one by one;
    returns the batch's results."""
    import numpy as np

    both = seg.segment(images, list(classes))
    again = seg.segment(images, list(classes))
    single = seg.segment(images[1], list(classes))
    assert all(np.isfinite(r.maps).all() for r in both)
    assert np.array_equal(both[0].labels, again[0].labels)  # same inputs and seed, same masks
    assert np.array_equal(both[0].maps, again[0].maps)
    assert np.allclose(both[1].maps, single.maps, atol=1e-5)  # batch equals singles
    return both


def assert_prompt_session_runs_the_denoiser_once(seg, denoiser, image) -> None:
    """A point and a box on one image share the session's single forward pass."""
    calls = []
    hook = denoiser.register_forward_hook(lambda *a: calls.append(1))
    try:
        session = seg.prompt_session(image)
        point, box = session.segment(points=[(4, 4)]), session.segment(box=(0, 0, 16, 16))
    finally:
        hook.remove()
    assert len(calls) == 1 and point.mask.shape == box.mask.shape == (32, 32)


def assert_batch_equals_single_with_clustering(seg, images, classes=("cat", "dog"), **overrides):
    """With the KL clustering on (the dataset presets), a batch gives the maps of single calls up to
    float rounding and the same labels (a near-tie pixel may round the other way: at most 0.1%).
    Batched convolutions differ from single ones by ~1e-8, which the clustering's distances must
    not turn into other clusters. ``classes``: one list for every image or one list per image."""
    import numpy as np

    per_image = [list(c) for c in classes] if isinstance(classes[0], (list, tuple)) else [list(classes)] * len(images)
    batch = seg.segment(images, per_image, clustering=True, batch_size=len(images), **overrides)
    assert batch[0].settings.clustering
    for image, names, in_batch in zip(images, per_image, batch):
        alone = seg.segment(image, names, clustering=True, **overrides)
        assert np.isfinite(in_batch.maps).all()
        np.testing.assert_allclose(in_batch.maps, alone.maps, rtol=1e-4, atol=1e-5)
        assert (in_batch.labels == alone.labels).mean() >= 0.999
