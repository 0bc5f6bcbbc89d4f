"""A model family defined in this file alone segments end to end (issue #33, item 1).

The toy family is nothing iseg knows: a denoiser (``ToyNet``) on the latent grid with a
self-attention and a cross-attention module (diffusers' ``Attention``), then, on a grid half as
fine, one attention over ``[text; image]`` tokens at once that capture splits into a cross and a
self map. Its pipeline keeps the denoiser under a name no diffusers pipeline uses (``net``). The
family's backbone, its layer table and both of its recording processors live here; nothing in
``iseg`` is edited to add it, only ``iseg.backbones.register_backbone`` is called.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import tiny
import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention

import iseg
from iseg.backbones import Backbone, backbone_for, family_of, register_backbone, unregister_backbone
from iseg.capture import (
    AttentionLayer,
    CaptureProcessor,
    SplitCaptureProcessor,
    attention_layers,
    capture_attention,
    install_capture,
    split_heads,
)
from iseg.loading import LoadedModel, ModelFolderError, check_components
from iseg.prompts import Prompt, encode_prompt

DIM, HEADS = 32, 2


def _joined_attention(attn, image, text):
    """Queries, keys and values of ``[text; image]`` tokens, ``(B, heads, n, head_dim)``."""
    joined = torch.cat([text, image], dim=1)
    return split_heads(attn, attn.to_q(joined), attn.to_k(joined), attn.to_v(joined))


def _joined_output(attn, query, key, value, n_text):
    out = F.scaled_dot_product_attention(query, key, value)
    out = out.transpose(1, 2).flatten(2)[:, n_text:]  # the image tokens' rows
    return attn.to_out[1](attn.to_out[0](out))


class JoinedAttnProcessor:
    """The toy's own attention over ``[text; image]``: one softmax, image rows returned."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        query, key, value = _joined_attention(attn, hidden_states, encoder_hidden_states)
        return _joined_output(attn, query, key, value, encoder_hidden_states.shape[1])


class ToyCaptureProcessor(CaptureProcessor):
    """The family's processor for its separate modules: ``CaptureProcessor``, counting its calls."""

    calls: list[str] = []

    def __call__(self, attn, hidden_states, *args, **kwargs):
        ToyCaptureProcessor.calls.append(self.name)
        return super().__call__(attn, hidden_states, *args, **kwargs)


class ToyJoinedCaptureProcessor(SplitCaptureProcessor):
    """The family's processor for its joined module: its output is ``JoinedAttnProcessor``'s and
    the image queries' softmax is recorded, split by key (the keys are ``[text; image]``)."""

    text_first = True
    calls: list[str] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        ToyJoinedCaptureProcessor.calls.append(attn.heads)
        n_text = encoder_hidden_states.shape[1]
        query, key, value = _joined_attention(attn, hidden_states, encoder_hidden_states)
        self.record(query[:, :, n_text:], key, hidden_states.shape[1], attn.scale)
        return _joined_output(attn, query, key, value, n_text)


class ToyNet(AttentionMixin, torch.nn.Module):
    """Latent -> tokens; self- then cross-attention on the latent grid; average-pooled to half the
    side; one joined text-and-image attention there."""

    def __init__(self, channels: int = 4, text_dim: int = 32):
        super().__init__()
        self.proj_in = torch.nn.Conv2d(channels, DIM, 1)
        self.self0 = Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS)
        self.cross0 = Attention(query_dim=DIM, cross_attention_dim=text_dim, heads=HEADS, dim_head=DIM // HEADS)
        self.text_in = torch.nn.Linear(text_dim, DIM)
        self.joined1 = Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS, processor=JoinedAttnProcessor())
        self.config = SimpleNamespace(sample_size=16, in_channels=channels)  # what a loaded folder's check reads

    def forward(self, z, t, text):
        b, _, h, w = z.shape
        x = self.proj_in(z).flatten(2).transpose(1, 2)  # (B, h*w, DIM)
        x = x + self.self0(x)
        x = x + self.cross0(x, encoder_hidden_states=text)
        low = F.avg_pool2d(x.transpose(1, 2).reshape(b, DIM, h, w), 2).flatten(2).transpose(1, 2)
        return low + self.joined1(low, encoder_hidden_states=self.text_in(text))


class ToyPipeline:
    """The tiny VAE, CLIP text encoder, tokenizer and DDIM schedule of ``tests/tiny.py``, and a ``ToyNet``."""

    def __init__(self, seed: int = 3):
        parts = tiny.tiny_components(seed)
        self.vae, self.text_encoder, self.tokenizer = parts["vae"], parts["text_encoder"], parts["tokenizer"]
        self.scheduler = parts["scheduler"]
        self.net = ToyNet()


class ToyBackbone(Backbone):
    """The toy family as the method sees it."""

    parts = ("net", "vae", "text_encoder", "tokenizer", "scheduler")

    def __init__(self, pipe):
        super().__init__(pipe, pipe.net, pipe.tokenizer)

    @classmethod
    def accepts(cls, pipe) -> bool:
        return isinstance(pipe, ToyPipeline)

    @classmethod
    def layers_of(cls, denoiser):
        if not isinstance(denoiser, ToyNet):
            return None
        return [AttentionLayer("self0", "self", 0, HEADS, processor=ToyCaptureProcessor),
                AttentionLayer("cross0", "cross", 0, HEADS, processor=ToyCaptureProcessor),
                AttentionLayer("joined1:text", "cross", 1, HEADS, module="joined1", processor=ToyJoinedCaptureProcessor),
                AttentionLayer("joined1:image", "self", 1, HEADS, module="joined1", processor=ToyJoinedCaptureProcessor)]

    @property
    def native_size(self) -> int:
        return 32

    def size_step(self) -> int:
        return self.latent_scale * 2  # the joined module's grid halves the latent

    def add_noise(self, z0, noise, t):
        return self.pipe.scheduler.add_noise(z0, noise, t)

    def denoise(self, z_t, t, embedding, module=None) -> None:
        (self.denoiser if module is None else module)(z_t, t, embedding)

    def default_cross_weights(self, latent_side: int) -> dict[int, float]:
        return {latent_side: 0.5, latent_side // 2: 0.5}

    def encode_text(self, prompt: Prompt) -> torch.Tensor:
        encoder = self.pipe.text_encoder
        return encode_prompt(encoder, prompt.input_ids, next(encoder.parameters()).device)


@pytest.fixture
def toy():
    register_backbone("toy", ToyBackbone, ("ToyPipeline",))
    ToyCaptureProcessor.calls.clear()
    ToyJoinedCaptureProcessor.calls.clear()
    try:
        with torch.no_grad():
            yield ToyPipeline()
    finally:
        unregister_backbone("toy")


def _image(seed=0, side=32):
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def test_a_family_defined_in_a_test_file_segments_end_to_end(toy):
    assert family_of(toy) == "toy" and isinstance(backbone_for(toy), ToyBackbone)
    seg = iseg.ISeg(toy)
    assert seg.forward.attention_kind == "joint"  # it has a module whose softmax capture splits
    plan = seg.plan(16)
    assert sorted(plan.weights) == [8, 16]
    assert {r: [layer.name for layer in g] for r, g in plan.cross.items()} == {16: ["cross0"], 8: ["joined1:text"]}
    assert [layer.name for layer in plan.self_layers] == ["self0"] and plan.self_resolution == 16
    originals = dict(toy.net.attn_processors)

    result = seg.segment(_image(), ["a", "b"])

    assert result.labels.shape == (32, 32) and set(np.unique(result.labels)) <= {0, 1, 2}
    assert result.maps.shape[1:] == (2, 16, 16) and np.isfinite(result.maps).all()
    assert result.initial.shape == (2, 16, 16) and np.isfinite(result.initial).all()
    # the family's own processors recorded its attention, and gave the denoiser back its own
    assert sorted(set(ToyCaptureProcessor.calls)) == ["cross0", "self0"] and ToyJoinedCaptureProcessor.calls == [HEADS]
    assert {k: type(v) for k, v in toy.net.attn_processors.items()} == {k: type(v) for k, v in originals.items()}
    # the same inputs give the same masks
    again = seg.segment(_image(), ["a", "b"])
    assert np.array_equal(again.labels, result.labels) and np.allclose(again.maps, result.maps)


def test_its_split_maps_are_the_joined_softmax_renormalised(toy):
    """The joined module's recorded maps against a softmax computed here from its projections."""
    net = toy.net
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    plain = net(z, torch.tensor([10, 10]), text)
    names = ["joined1:text", "joined1:image", "cross0"]  # layers by name, found in the toy's own table
    with capture_attention(net, names) as store:
        captured = net(z, torch.tensor([10, 10]), text)
    assert torch.allclose(plain, captured, atol=1e-6)  # capture does not change the output

    b, n_image = 2, 16
    low = F.avg_pool2d(_tokens_after_cross0(net, z, text).transpose(1, 2).reshape(b, DIM, 8, 8), 2)
    low = low.flatten(2).transpose(1, 2).double()
    t_in = net.text_in(text).double()
    attn = net.joined1
    q = (low @ attn.to_q.weight.double().T).view(b, n_image, HEADS, -1).transpose(1, 2)
    joined = torch.cat([t_in, low], dim=1)
    k = (joined @ attn.to_k.weight.double().T).view(b, 5 + n_image, HEADS, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * (DIM // HEADS) ** -0.5
    expect_text = scores[..., :5].softmax(-1).mean(1)
    expect_image = scores[..., 5:].softmax(-1).mean(1)
    assert torch.allclose(store.mean("joined1:text").double(), expect_text, atol=1e-5)
    assert torch.allclose(store.mean("joined1:image").double(), expect_image, atol=1e-5)
    assert store.mean("cross0").shape == (2, 64, 5)


def _tokens_after_cross0(net, z, text):
    x = net.proj_in(z).flatten(2).transpose(1, 2)
    x = x + net.self0(x)
    return x + net.cross0(x, encoder_hidden_states=text)


def test_a_loaded_folder_of_the_family_is_checked_by_its_backbone(toy):
    assert LoadedModel.of(toy).family == "toy" and LoadedModel.of(toy).denoiser is toy.net
    check_components(toy, "the toy")  # its parts fit
    toy.net.config.in_channels = 8
    with pytest.raises(ModelFolderError, match="the toy: the net takes 8 input channels but the VAE makes 4-channel"):
        check_components(toy, "the toy")
    toy.net.config.in_channels, toy.net.config.sample_size = 4, 0
    with pytest.raises(ModelFolderError, match=r"the toy: net/config.json has sample_size 0"):
        check_components(toy, "the toy")
    toy.scheduler = None
    with pytest.raises(ModelFolderError, match=r"the toy has no scheduler; .* \(net, vae, text_encoder, tokenizer, "):
        check_components(toy, "the toy")


def test_unregistered_the_family_is_unknown_again():
    net = ToyNet()
    register_backbone("toy", ToyBackbone)
    try:
        assert [layer.name for layer in attention_layers(net)][:2] == ["self0", "cross0"]
        with pytest.raises(ValueError, match="registered already"):
            register_backbone("toy", ToyBackbone)
    finally:
        unregister_backbone("toy")
    with pytest.raises(TypeError, match="no model family iseg knows has a ToyNet denoiser"):
        attention_layers(net)
    with pytest.raises(TypeError, match="has no unet; iSeg needs a Stable-Diffusion-style pipeline"):
        iseg.ISeg(ToyPipeline())
    with pytest.raises(TypeError, match="Backbone subclass"):
        register_backbone("toy", object)


def test_a_processor_that_cannot_attach_leaves_the_denoiser_as_it_was():
    class CannotAttach(ToyCaptureProcessor):
        def attach(self, denoiser, target):
            raise RuntimeError(f"no hook for {target}")

    net = ToyNet()
    before = {k: type(v) for k, v in net.attn_processors.items()}
    with pytest.raises(RuntimeError, match="no hook for self0"):
        install_capture(net, [AttentionLayer("self0", "self", 0, HEADS, processor=CannotAttach)])
    assert {k: type(v) for k, v in net.attn_processors.items()} == before
    store, restore = install_capture(net, [AttentionLayer("self0", "self", 0, HEADS, processor=ToyCaptureProcessor)])
    assert type(net.attn_processors["self0.processor"]) is ToyCaptureProcessor
    restore()
    restore()  # a second restore changes nothing
    assert {k: type(v) for k, v in net.attn_processors.items()} == before
    with pytest.raises(ValueError, match="name different processors"):
        install_capture(net, [AttentionLayer("joined1:text", "cross", 1, HEADS, module="joined1",
                                             processor=ToyJoinedCaptureProcessor),
                              AttentionLayer("joined1:image", "self", 1, HEADS, module="joined1")])
