"""Attention capture through diffusers' processor API."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from iseg.capture import CaptureProcessor, attention_layers, capture_attention, select_layers


def _inputs(pipe, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, 16, 16, generator=g)
    e = torch.randn(batch, 77, 32, generator=g)
    return z, torch.full((batch,), 100), e


def test_layers_are_found_by_kind_and_resolution(tiny_pipe):
    unet = tiny_pipe.unet
    cross16 = select_layers(unet, "cross", [16], latent_side=16)
    assert [layer.name.split(".transformer")[0] for layer in cross16] == [
        "down_blocks.0.attentions.0", "down_blocks.0.attentions.1",
        "up_blocks.3.attentions.0", "up_blocks.3.attentions.1", "up_blocks.3.attentions.2"]
    assert all(layer.kind == "cross" and layer.resolution(16) == 16 for layer in cross16)
    assert {layer.resolution(16) for layer in select_layers(unet, "self", [4, 8], 16)} == {4, 8}
    named = select_layers(unet, "self", names=["up_blocks.3.attentions.1"])
    assert [layer.name for layer in named] == ["up_blocks.3.attentions.1.transformer_blocks.0.attn1"]
    with pytest.raises(ValueError, match="no self-attention layer matches"):
        select_layers(unet, "self", names=["up_blocks.9"])
    with pytest.raises(ValueError, match="resolution"):
        select_layers(unet, "cross", [5], 16)
    with pytest.raises(ValueError, match="kind"):
        select_layers(unet, "both")


def test_output_equals_sdpa_and_rows_sum_to_one(tiny_pipe):
    unet = tiny_pipe.unet
    z, t, e = _inputs(tiny_pipe)
    with torch.no_grad():
        plain = unet(z, t, encoder_hidden_states=e).sample
        layers = attention_layers(unet)  # every layer, self and cross
        with capture_attention(unet, layers) as store:
            captured = unet(z, t, encoder_hidden_states=e).sample
    assert torch.allclose(plain, captured, atol=1e-5)
    assert len(store) == len(layers)
    for name in store.names():
        a = store.mean(name)
        assert a.dtype == torch.float32
        assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5)
    cross = store.by_resolution("cross")
    assert sorted(cross) == [2, 4, 8, 16] and cross[16].shape == (2, 256, 77)


def test_heads_subset_and_per_head(tiny_pipe):
    unet = tiny_pipe.unet
    z, t, e = _inputs(tiny_pipe)
    layer = select_layers(unet, "self", names=["up_blocks.3.attentions.1"])
    with torch.no_grad():
        with capture_attention(unet, layer, per_head=True) as every:
            unet(z, t, encoder_hidden_states=e)
        with capture_attention(unet, layer, heads=[1]) as one:
            unet(z, t, encoder_hidden_states=e)
    name = layer[0].name
    per_head = every.heads(name)
    assert per_head.shape == (2, 2, 256, 256)
    assert torch.allclose(one.mean(name), per_head[:, 1], atol=1e-6)
    assert torch.allclose(every.mean(name), per_head.mean(1), atol=1e-6)


def test_processors_are_restored_also_on_error(tiny_pipe):
    unet = tiny_pipe.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    layers = select_layers(unet, "cross", [16], 16)
    with capture_attention(unet, layers):
        inside = unet.attn_processors
        assert isinstance(inside[layers[0].name + ".processor"], CaptureProcessor)
        assert isinstance(inside["mid_block.attentions.0.transformer_blocks.0.attn2.processor"], AttnProcessor2_0)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(unet, layers):
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_accumulate_sums_forward_passes(tiny_pipe):
    unet = tiny_pipe.unet
    z, t, e = _inputs(tiny_pipe, batch=1)
    layer = select_layers(unet, "cross", [4], 16)[:1]
    with torch.no_grad(), capture_attention(unet, layer, accumulate=True) as store:
        unet(z, t, encoder_hidden_states=e)
        first = store.sums[layer[0].name].clone()
        unet(z, t, encoder_hidden_states=e)
    assert torch.allclose(store.sums[layer[0].name], 2 * first)
    assert store.counts[layer[0].name] == 2 * layer[0].heads
