"""Numbers you can trust: settings beyond float32's range are refused before any model runs, and NaN
or infinity anywhere in the pass (weights, VAE config, float16 overflow) is an error naming its
source, never a clean-looking all-background mask."""

import contextlib
import dataclasses
import math
import re

import numpy as np
import pytest
import tiny
import torch

import iseg
from iseg.numerics import NonFiniteError


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe():
    return tiny.tiny_pipeline(seed=0, sd_layout=True)


@contextlib.contextmanager
def _poisoned(param: torch.nn.Parameter, value=math.nan):
    kept = param.detach().clone()
    with torch.no_grad():
        param.view(-1)[0] = value
    try:
        yield
    finally:
        with torch.no_grad():
            param.copy_(kept)


@contextlib.contextmanager
def _vae_config(vae, **values):
    kept = {k: vae.config[k] for k in values}
    vae.register_to_config(**values)
    try:
        yield
    finally:
        vae.register_to_config(**kept)


@pytest.mark.parametrize("overrides, name", [
    (dict(gamma=1e40), "gamma=1e+40"),
    (dict(gamma=1e-320), "gamma=1e-320"),
    (dict(lam=1e300), "lam=1e+300"),
    (dict(cross_weights={16: 1e300}), "cross_weights=1e+300"),
    (dict(cross_weights={16: 1e-320, 8: 1.0}), "cross_weights=1e-320"),
    (dict(clamp_max=1e300), "clamp_max=1e+300"),
    (dict(bg_power=1e39), "bg_power=1e+39"),
])
def test_settings_beyond_float32_are_refused_before_the_model_runs(pipe, overrides, name):
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(iseg.SettingsError, match=f"setting {re.escape(name)} is beyond what float32 arithmetic holds"):
            iseg.ISeg(pipe, **overrides)
        seg = iseg.ISeg(pipe)
        with pytest.raises(iseg.SettingsError, match="float32"):
            seg.segment(_image(), ["cat"], **overrides)
    finally:
        hook.remove()
    assert not calls
    # the edges of the range are accepted: 0 where 0 means "off", and 1e30
    iseg.make_settings(None, lam=1e30, gamma=1e-30, cross_weights={16: 0, 8: 1e30}, clamp_max=1e30)


def test_nan_weights_are_an_error_naming_their_stage(pipe):
    seg = iseg.ISeg(pipe, iterations=2)
    assert np.isfinite(seg.segment(_image(), ["cat"]).maps).all()
    with _poisoned(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight):
        with pytest.raises(NonFiniteError, match=r"cross-attention captured at resolution \d+ has NaN.*denoiser"):
            seg.segment(_image(), ["cat"])
    norm = next(p for n, p in pipe.text_encoder.named_parameters() if n.endswith("final_layer_norm.weight"))
    with _poisoned(norm):  # the last layer norm's first weight: one NaN in every token's output
        with pytest.raises(NonFiniteError, match="prompt embedding .* text encoder.*gamma"):
            iseg.ISeg(pipe).segment(_image(), ["dog"])
    with _poisoned(pipe.vae.encoder.conv_in.weight):
        with pytest.raises(NonFiniteError, match="noisy latents .* VAE"):
            seg.segment(_image(), ["cat"])
    assert np.isfinite(seg.segment(_image(), ["cat"]).maps).all()  # everything restored


def test_a_trace_with_nan_attention_names_the_layer(pipe):
    seg = iseg.ISeg(pipe)
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    with _poisoned(attn.to_q.weight):  # every map of that self-attention layer (and the layers after it) is NaN
        with pytest.raises(NonFiniteError, match=r"the attention captured in layer down_blocks\.0\.attentions\.0\."
                                                 r"transformer_blocks\.0\.attn1 has NaN .*denoiser"):
            seg.trace(_image(), ["cat"])
    trace = seg.trace(_image(), ["cat"])  # restored: every captured map is finite
    assert all(np.isfinite(trace.store.mean(n).cpu().numpy()).all() for n in trace.store.names())


@pytest.mark.parametrize("factor", [0.0, math.nan, math.inf])
def test_a_vae_scaling_factor_of_zero_or_nan_is_refused(pipe, factor):
    seg = iseg.ISeg(pipe, iterations=1)
    with _vae_config(pipe.vae, scaling_factor=factor):
        with pytest.raises(NonFiniteError, match=f"scaling_factor is {factor!r}: it must be a finite non-zero number"):
            seg.segment(_image(), ["cat"])


def test_decode_names_nan_self_attention_and_cross_attention(pipe):
    seg = iseg.ISeg(pipe, iterations=2)
    obs = seg.observe(_image(), ["cat"])[0]
    bad_self = obs.self_attention.clone()
    bad_self[3, 5] = math.nan
    with pytest.raises(NonFiniteError, match="the self-attention has NaN"):
        iseg.decode.decode([dataclasses.replace(obs, self_attention=bad_self)])
    bad_cross = {r: a.clone() for r, a in obs.cross.items()}
    next(iter(bad_cross.values()))[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match="class evidence X .* cross_weights"):
        iseg.decode.decode([dataclasses.replace(obs, cross=bad_cross)])
    assert np.isfinite(seg.decode(obs).maps).all()
    # an interactive prompt (a point) refines the same self-attention: the same error
    from iseg.interactive import empty_prompt, prompt_result

    bad = dataclasses.replace(obs, self_attention=bad_self)
    with pytest.raises(NonFiniteError, match="the self-attention has NaN"):
        prompt_result(bad, empty_prompt(pipe.tokenizer), "points", [(4, 4)], obs.settings)
    assert prompt_result(obs, empty_prompt(pipe.tokenizer), "points", [(4, 4)], obs.settings).mask.any()


def test_float16_arithmetic_on_cpu_gives_no_nan_and_no_silent_mask():
    # torch runs float16 matmul, softmax and convolutions on the CPU: what fp16 on CUDA does to users
    half = tiny.tiny_pipeline(seed=0, sd_layout=True).to(torch.float16)
    full = tiny.tiny_pipeline(seed=0, sd_layout=True)
    assert half.unet.dtype == torch.float16
    seg16, seg32 = iseg.ISeg(half, iterations=3), iseg.ISeg(full, iterations=3)
    for image in (_image(0), _image(1)):
        r16, r32 = seg16.segment(image, ["cat", "dog"]), seg32.segment(image, ["cat", "dog"])
        assert np.isfinite(r16.maps).all() and r16.maps.max() > 0
        assert (r16.labels == r32.labels).mean() > 0.9  # float16 rounding moves a few boundary pixels
    obs = seg16.observe(_image(0), ["cat"])[0]
    assert obs.self_attention.dtype == torch.float16 or torch.isfinite(obs.self_attention).all()
    # a gamma that float32 holds but float16 does not (embedding * 1e6 > 65504): an error, not a mask
    with pytest.raises(NonFiniteError, match=r"prompt embedding .* has infinite values \(dtype float16\).*gamma"):
        seg16.segment(_image(0), ["cat"], gamma=1e6)
