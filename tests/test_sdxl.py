"""The SDXL family on a tiny SDXL-shaped pipeline built from configs: conditioning equals
diffusers' own, Cat-Cross touches exactly the class tokens of both encoders, noise follows the
Euler schedule, capture does not change the UNet's output, and the method runs end to end."""

import json

import numpy as np
import pytest
import tiny
import torch
from family_checks import (
    assert_batch_equals_single_with_clustering,
    assert_prompt_session_runs_the_denoiser_once,
    assert_segments_alike,
)

import iseg
from iseg.backbones import SDXLBackbone, backbone_for, family_of
from iseg.capture import capture_attention


@pytest.fixture(scope="module")
def sdxl_pipe():
    return tiny.tiny_sdxl_pipeline(seed=0)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_family_and_sizes(sdxl_pipe):
    assert family_of(sdxl_pipe) == "sdxl"
    seg = iseg.ISeg(sdxl_pipe)
    assert isinstance(seg.backbone, SDXLBackbone) and seg.model.family == "sdxl"
    assert (seg.backbone.native_size, seg.backbone.size_step()) == (32, 8)
    plan = seg.plan(16)
    # no attention at the latent's own side: self-attention is read at latent/2, cross at /2 and /4
    assert plan.self_resolution == 8 and set(plan.cross) == {4, 8}
    assert all(layer.level == 1 for layer in plan.self_layers)


def test_conditioning_equals_the_pipelines_own(sdxl_pipe):
    seg = iseg.ISeg(sdxl_pipe)
    prompt = seg.prompt_for(["cat", "dog"])
    ours = seg.backbone.encode_text(prompt)  # (1, 77 + 1, 64)
    embeds, _, pooled, _ = sdxl_pipe.encode_prompt(prompt.text, device="cpu", do_classifier_free_guidance=False)
    assert ours.shape == (1, 78, 64)
    assert torch.allclose(ours[:, :77], embeds, atol=1e-5)
    assert torch.allclose(ours[0, 77, :32], pooled[0], atol=1e-5) and not ours[0, 77, 32:].any()


def test_cat_cross_scales_the_class_tokens_of_both_encoders_only(sdxl_pipe):
    seg = iseg.ISeg(sdxl_pipe)
    prompt = seg.prompt_for(["cat", "dog"])
    plain, scaled = seg.embedding(prompt, 1.0), seg.embedding(prompt, 1.6)
    classes = sorted({i for span in prompt.spans for i in span})
    others = [i for i in range(78) if i not in classes]
    assert torch.allclose(scaled[0, classes], 1.6 * plain[0, classes])  # all 64 features: both encoders
    assert torch.equal(scaled[0, others], plain[0, others])  # other tokens and the pooled row untouched


def test_noise_is_what_the_euler_scheduler_feeds_the_unet(sdxl_pipe):
    seg = iseg.ISeg(sdxl_pipe, seed=3, timestep=100)
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    z_t, t = seg.forward.noisy(z0, seg.settings.seed, seg.settings.timestep)
    eps = torch.randn(4, 16, 16, generator=torch.Generator("cpu").manual_seed(3))
    a = sdxl_pipe.scheduler.alphas_cumprod[100]
    sigma = ((1 - a) / a).sqrt()  # Euler: x = z0 + sigma * eps, scaled by 1 / sqrt(sigma^2 + 1)
    assert torch.allclose(z_t, (z0 + sigma * eps) / (sigma**2 + 1).sqrt(), atol=1e-5)


def test_capture_returns_what_sdpa_returns_and_rows_sum_to_one(sdxl_pipe):
    seg = iseg.ISeg(sdxl_pipe)
    backbone = seg.backbone
    prompt = seg.prompt_for(["cat"])
    emb = seg.embedding(prompt, 1.6)
    z_t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100])
    hidden, pooled = emb[:, :-1], emb[:, -1, :32]
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        plain = backbone.denoiser(z_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        layers = seg.plan(16).layers()
        with capture_attention(backbone.denoiser, layers) as store:
            captured = backbone.denoiser(z_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    assert torch.allclose(plain, captured, atol=1e-5)
    for name in store.names():
        assert torch.allclose(store.mean(name).sum(-1), torch.tensor(1.0), atol=1e-4)
    assert store.by_resolution("cross")[4].shape == (1, 16, 77)


def test_segment_trace_and_session_end_to_end(sdxl_pipe):
    seg = iseg.ISeg(sdxl_pipe, iterations=3, clustering=False)
    images = [_image(1), _image(2)]
    both = assert_segments_alike(seg, images)
    assert both[0].maps.shape == (4, 2, 8, 8) and both[0].labels.shape == (32, 32)
    trace = seg.trace(images[0], ["cat"])
    assert {layer.kind for layer in trace.layers()} == {"self", "cross"}
    assert trace.class_map(trace.layers("cross")[0].name, "cat").shape in {(4, 4), (8, 8)}
    assert_prompt_session_runs_the_denoiser_once(seg, sdxl_pipe.unet, images[0])


def test_batch_equals_single_with_clustering(sdxl_pipe):
    # before the clustering's distances were computed in float64, 8.5% of labels differed here
    assert_batch_equals_single_with_clustering(iseg.ISeg(sdxl_pipe, iterations=3), [_image(i) for i in range(4)])


def test_a_float16_vae_that_needs_upcasting_encodes_in_float32():
    pipe = tiny.tiny_sdxl_pipeline(seed=1)
    pipe.vae.to(torch.float16)
    backbone_for(pipe)
    assert next(pipe.vae.parameters()).dtype == torch.float32


def test_load_model_reads_the_family_from_model_index(sdxl_pipe, tmp_path):
    sdxl_pipe.save_pretrained(tmp_path / "sdxl")
    model = iseg.load_model(tmp_path / "sdxl", device="cpu", verbose=False)
    assert model.family == "sdxl" and type(model.pipe).__name__ == "StableDiffusionXLPipeline"
    index = json.loads((tmp_path / "sdxl" / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (tmp_path / "sdxl" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(iseg.loading.UnsupportedPipelineError, match="KandinskyPipeline.*StableDiffusionXLPipeline"):
        iseg.load_model(tmp_path / "sdxl", device="cpu", verbose=False)


def test_float16_unet_with_a_float32_vae_segments():
    # SDXL keeps its VAE in float32 (force_upcast); the latents must reach the UNet in its own dtype
    pipe = tiny.tiny_sdxl_pipeline(seed=2).to(dtype=torch.float16)
    seg = iseg.ISeg(pipe, iterations=2, clustering=False)
    assert next(pipe.vae.parameters()).dtype == torch.float32
    r = seg.segment(_image(3), ["cat", "dog"])
    assert np.isfinite(r.maps).all() and r.labels.shape == (32, 32)
