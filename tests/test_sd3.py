"""The SD3 family on a tiny SD3-shaped pipeline built from configs: conditioning equals
diffusers' own, Cat-Cross touches exactly the class tokens' CLIP rows, noise follows the flow
formula, the joint capture processor returns what ``JointAttnProcessor2_0`` returns and records
what a hand computation gives, and the method runs end to end."""

import json

import numpy as np
import pytest
import tiny
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from family_checks import (
    assert_batch_equals_single_with_clustering,
    assert_encode_inverts_decoding,
    assert_flow_matching_noise,
)

import iseg
from iseg.backbones import SD3Backbone, family_of
from iseg.backbones.sd3 import JointCaptureProcessor
from iseg.capture import capture_attention

CLIP_ROWS, T5_ROWS = 77, 256


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny.tiny_sd3_pipeline(seed=0)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _inputs(seg, classes=("cat",)):
    emb = seg.embedding(seg.prompt_for(list(classes)), 1.6)
    z_t = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    return z_t, torch.tensor([400]), emb


def _run(backbone, z_t, t, emb):
    hidden, pooled = emb[:, :-1], emb[:, -1, :64]
    return backbone.denoiser(hidden_states=z_t, encoder_hidden_states=hidden, pooled_projections=pooled,
                             timestep=t.float(), return_dict=False)[0]


def test_family_sizes_and_layers(sd3_pipe):
    assert family_of(sd3_pipe) == "sd3"
    seg = iseg.ISeg(sd3_pipe)
    assert isinstance(seg.backbone, SD3Backbone) and seg.model.family == "sd3"
    assert (seg.backbone.native_size, seg.backbone.size_step(), seg.backbone.latent_scale) == (32, 4, 2)
    layers = seg.backbone.attention_layers()
    assert [layer.name for layer in layers] == ["transformer_blocks.0.attn:text", "transformer_blocks.0.attn:image",
                                               "transformer_blocks.1.attn:text", "transformer_blocks.1.attn:image"]
    assert {layer.kind for layer in layers[::2]} == {"cross"} and {layer.kind for layer in layers[1::2]} == {"self"}
    assert all(layer.module == layer.name.split(":")[0] and layer.heads == 4 for layer in layers)
    plan = seg.plan(16)
    # one patch grid (latent / 2): cross-attention weight 1 there, self-attention read there
    assert dict(plan.weights) == {8: 1.0} and plan.self_resolution == 8
    assert [layer.name for layer in plan.cross[8]] == [layers[0].name, layers[2].name]
    assert [layer.name for layer in plan.self_layers] == [layers[1].name, layers[3].name]
    named = seg.plan(16, seg.with_settings(cross_layers=("transformer_blocks.1",), self_layers=("transformer_blocks.0.attn",)))
    assert [layer.name for layer in named.cross[8]] == ["transformer_blocks.1.attn:text"]
    assert [layer.name for layer in named.self_layers] == ["transformer_blocks.0.attn:image"]


def test_conditioning_equals_the_pipelines_own(sd3_pipe):
    seg = iseg.ISeg(sd3_pipe)
    prompt = seg.prompt_for(["cat", "dog"])
    ours = seg.backbone.encode_text(prompt)  # (1, 77 + 256 + 1, 64)
    embeds, _, pooled, _ = sd3_pipe.encode_prompt(prompt.text, prompt_2=None, prompt_3=None, device="cpu",
                                                  do_classifier_free_guidance=False)
    assert ours.shape == (1, CLIP_ROWS + T5_ROWS + 1, 64) and embeds.shape == (1, CLIP_ROWS + T5_ROWS, 64)
    assert torch.allclose(ours[:, :-1], embeds, atol=1e-5)
    assert torch.allclose(ours[0, -1], pooled[0], atol=1e-5)  # CLIP-L and CLIP-G pooled, 32 + 32
    assert not ours[0, CLIP_ROWS:-1].any()  # no T5: zeros, as diffusers


def test_conditioning_with_a_t5_encoder_equals_the_pipelines_own():
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    base = tiny.tiny_sd3_pipeline(seed=0)
    torch.manual_seed(1)
    t5 = T5EncoderModel(T5Config(vocab_size=49408, d_model=64, d_ff=37, d_kv=8, num_layers=1, num_heads=4)).eval()
    pipe = StableDiffusion3Pipeline(**{**base.components, "text_encoder_3": t5, "tokenizer_3": tiny.clip_tokenizer()})
    seg = iseg.ISeg(pipe)
    prompt = seg.prompt_for(["cat"])
    ours = seg.backbone.encode_text(prompt)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt.text, prompt_2=None, prompt_3=None, device="cpu",
                                              do_classifier_free_guidance=False)
    assert torch.allclose(ours[:, :-1], embeds, atol=1e-5) and torch.allclose(ours[0, -1], pooled[0], atol=1e-5)
    assert ours[0, CLIP_ROWS:-1].abs().sum() > 0


def test_cat_cross_scales_the_class_tokens_clip_rows_only(sd3_pipe):
    seg = iseg.ISeg(sd3_pipe)
    # stand-in T5 rows that are not zero, so that scaling them would show
    rows = torch.randn(1, T5_ROWS, 64, generator=torch.Generator().manual_seed(0))
    seg.backbone._t5 = lambda text, device: rows.to(device)
    prompt = seg.prompt_for(["cat", "dog"])
    plain, scaled = seg.embedding(prompt, 1.0), seg.embedding(prompt, 1.6)
    classes = sorted({i for span in prompt.spans for i in span})
    assert classes and max(classes) < CLIP_ROWS
    others = [i for i in range(plain.shape[1]) if i not in classes]
    assert torch.allclose(scaled[0, classes], 1.6 * plain[0, classes])
    assert torch.equal(scaled[0, others], plain[0, others])  # other CLIP tokens, the T5 rows, the pooled row
    assert torch.equal(plain[0, CLIP_ROWS:-1], rows[0])


def test_noise_is_the_flow_matching_interpolation(sd3_pipe):
    assert_flow_matching_noise(sd3_pipe, channels=16)


def test_encode_is_the_inverse_of_the_pipelines_decoding(sd3_pipe):
    assert_encode_inverts_decoding(sd3_pipe, channels=16)



def test_capture_returns_what_the_joint_processor_returns(sd3_pipe):
    seg = iseg.ISeg(sd3_pipe)
    backbone = seg.backbone
    assert all(isinstance(p, JointAttnProcessor2_0) for p in backbone.denoiser.attn_processors.values())
    z_t, t, emb = _inputs(seg)
    with torch.no_grad():
        plain = _run(backbone, z_t, t, emb)
        with capture_attention(backbone.denoiser, backbone.attention_layers()) as store:
            assert all(isinstance(p, JointCaptureProcessor) for p in backbone.denoiser.attn_processors.values())
            captured = _run(backbone, z_t, t, emb)
    assert all(isinstance(p, JointAttnProcessor2_0) for p in backbone.denoiser.attn_processors.values())
    assert torch.allclose(plain, captured, atol=1e-5)
    n_text = CLIP_ROWS + T5_ROWS
    for name in store.names("cross"):
        assert store.mean(name).shape == (1, 64, n_text)
        assert torch.allclose(store.mean(name).sum(-1), torch.tensor(1.0), atol=1e-5)
    for name in store.names("self"):
        assert store.mean(name).shape == (1, 64, 64)
        assert torch.allclose(store.mean(name).sum(-1), torch.tensor(1.0), atol=1e-5)
    assert store.by_resolution("cross")[8].shape == (1, 64, n_text) and store.by_resolution("self")[8].shape == (1, 64, 64)


def _hand(backbone, z_t, t, emb, block: int = 1):
    """(B, heads, image queries, image keys) and (..., text keys): the joint softmax over
    [image; text] keys of one layer, each part renormalised over its keys."""
    attn = backbone.denoiser.transformer_blocks[block].attn
    seen = {}
    hook = attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            _run(backbone, z_t, t, emb)
    finally:
        hook.remove()
    x, c = seen["hidden_states"], seen["encoder_hidden_states"]

    def heads(y):
        return y.view(1, -1, attn.heads, 8).transpose(1, 2)

    with torch.no_grad():
        q = heads(attn.to_q(x))
        k = torch.cat([heads(attn.to_k(x)), heads(attn.add_k_proj(c))], dim=2)
        p = (q.double() @ k.double().transpose(-1, -2) * 8**-0.5).softmax(-1)
    n = x.shape[1]
    image, text = p[..., :n], p[..., n:]
    return image / image.sum(-1, keepdim=True), text / text.sum(-1, keepdim=True)


def test_captured_probabilities_equal_a_hand_computation(sd3_pipe, monkeypatch):
    seg = iseg.ISeg(sd3_pipe)
    backbone = seg.backbone
    z_t, t, emb = _inputs(seg, ("cat", "dog"))
    image, text = _hand(backbone, z_t, t, emb)
    layers = [layer for layer in backbone.attention_layers() if layer.module == "transformer_blocks.1.attn"]
    with torch.no_grad():
        with capture_attention(backbone.denoiser, layers, per_head=True) as heads:
            _run(backbone, z_t, t, emb)
        with capture_attention(backbone.denoiser, layers) as means:
            _run(backbone, z_t, t, emb)
        picked = {layers[0].name: [3, 1], layers[1].name: [2]}
        with capture_attention(backbone.denoiser, layers, heads=picked) as some:
            _run(backbone, z_t, t, emb)
        monkeypatch.setattr(JointCaptureProcessor, "ALL_HEADS_BYTES", 0)  # one head at a time
        with capture_attention(backbone.denoiser, layers, heads=picked) as one_by_one:
            _run(backbone, z_t, t, emb)
    text_name, image_name = "transformer_blocks.1.attn:text", "transformer_blocks.1.attn:image"
    assert torch.allclose(heads.heads(text_name).double(), text, atol=1e-5)
    assert torch.allclose(heads.heads(image_name).double(), image, atol=1e-5)
    assert torch.allclose(means.mean(text_name).double(), text.mean(1), atol=1e-5)
    assert torch.allclose(means.mean(image_name).double(), image.mean(1), atol=1e-5)
    assert torch.allclose(some.mean(text_name).double(), text[:, [1, 3]].mean(1), atol=1e-5)
    assert torch.allclose(some.mean(image_name).double(), image[:, 2], atol=1e-5)
    assert torch.allclose(one_by_one.mean(text_name), some.mean(text_name), atol=1e-6)
    assert torch.allclose(one_by_one.mean(image_name), some.mean(image_name), atol=1e-6)


def test_one_processor_serves_one_kind_alone_and_accumulates(sd3_pipe):
    seg = iseg.ISeg(sd3_pipe)
    backbone = seg.backbone
    z_t, t, emb = _inputs(seg)
    text_only = [layer for layer in backbone.attention_layers() if layer.kind == "cross"]
    with torch.no_grad():
        with capture_attention(backbone.denoiser, text_only) as once:
            _run(backbone, z_t, t, emb)
        with capture_attention(backbone.denoiser, text_only, accumulate=True) as twice:
            _run(backbone, z_t, t, emb)
            _run(backbone, z_t, t, emb)
    assert once.names() == [layer.name for layer in text_only] and not once.names("self")
    for name in once.names():
        assert twice.counts[name] == 2 * once.counts[name]
        assert torch.allclose(twice.mean(name), once.mean(name), atol=1e-6)
    with pytest.raises(ValueError, match="has 4 heads"):
        with capture_attention(backbone.denoiser, text_only, heads=[5]):
            _run(backbone, z_t, t, emb)


def test_batch_equals_single_with_clustering(sd3_pipe):
    assert_batch_equals_single_with_clustering(iseg.ISeg(sd3_pipe, iterations=3), [_image(i) for i in range(4)])


def test_segment_trace_and_session_end_to_end(sd3_pipe):
    seg = iseg.ISeg(sd3_pipe, iterations=3, clustering=False)
    images = [_image(1), _image(2)]
    both = seg.segment(images, ["cat", "dog"])
    again = seg.segment(images, ["cat", "dog"])
    single = seg.segment(images[1], ["cat", "dog"])
    assert both[0].maps.shape == (4, 2, 8, 8) and both[0].labels.shape == (32, 32)
    assert all(np.isfinite(r.maps).all() for r in both)
    assert np.array_equal(both[0].labels, again[0].labels)  # same inputs and seed, same masks
    assert np.allclose(both[1].maps, single.maps, atol=1e-5)  # batch equals singles
    trace = seg.trace(images[0], ["cat"])
    assert {layer.kind for layer in trace.layers()} == {"self", "cross"}
    assert trace.class_map("transformer_blocks.0.attn:text", "cat").shape == (8, 8)
    assert trace.store.heads("transformer_blocks.1.attn:image").shape == (1, 4, 64, 64)
    calls = []
    hook = sd3_pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        session = seg.prompt_session(images[0])
        point, box = session.segment(points=[(4, 4)]), session.segment(box=(0, 0, 16, 16))
    finally:
        hook.remove()
    assert len(calls) == 1 and point.mask.shape == box.mask.shape == (32, 32)


def test_load_model_reads_the_family_from_model_index(sd3_pipe, tmp_path):
    sd3_pipe.save_pretrained(tmp_path / "sd3")
    model = iseg.load_model(tmp_path / "sd3", device="cpu", verbose=False)
    assert model.family == "sd3" and type(model.pipe).__name__ == "StableDiffusion3Pipeline"
    assert model.pipe.text_encoder_3 is None
    index = json.loads((tmp_path / "sd3" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    seg = iseg.ISeg(model, iterations=1)
    assert seg.segment(_image(3), ["cat"]).labels.shape == (32, 32)


def test_compiled_forward_gives_the_plain_maps_and_gives_the_processors_back(sd3_pipe):
    # torch.compile (aot_eager: no C++ toolchain needed) around the joint capture changes no map
    seg = iseg.ISeg(sd3_pipe, iterations=3, clustering=False)
    images, classes = [_image(5), _image(6)], ["cat", "dog"]
    plain = seg.segment(images, classes)
    seg.compile("torch", backend="aot_eager")
    try:
        fast = seg.segment(images, classes)
        assert all(isinstance(p, JointCaptureProcessor) for p in sd3_pipe.transformer.attn_processors.values())
    finally:
        seg.compile(None)
    assert all(isinstance(p, JointAttnProcessor2_0) for p in sd3_pipe.transformer.attn_processors.values())
    for p, f in zip(plain, fast):
        assert np.allclose(p.maps, f.maps, atol=1e-4) and np.array_equal(p.labels, f.labels)


def test_a_text_the_two_clip_tokenizers_split_differently_is_refused(sd3_pipe, monkeypatch):
    seg = iseg.ISeg(sd3_pipe)
    prompt = seg.prompt_for(["cat"])
    real = iseg.backbones.base.token_ids

    def one_more(tokenizer, text, **options):  # the second tokenizer splits one word in two
        ids = real(tokenizer, text, **options)
        return ids[:2] + ids[1:-1]

    monkeypatch.setattr(iseg.backbones.base, "token_ids", one_more)
    with pytest.raises(ValueError, match="split the prompt .* differently"):
        seg.backbone.encode_text(prompt)


def test_a_resolution_off_the_patch_grid_is_refused(sd3_pipe):
    with pytest.raises(ValueError, match=r"cross_weights=\{4: 0.7, 8: 0.3\} asks for attention layers this model does "
                                         r"not have: .*no cross-attention at resolution\(s\) \[4\].*available: \[8\].*"
                                         r"No image size fits these settings"):
        iseg.ISeg(sd3_pipe, cross_weights={4: 0.7, 8: 0.3})   # refused when made, not at the first image
    seg = iseg.ISeg(sd3_pipe)
    with pytest.raises(ValueError, match=r"no cross-attention at resolution\(s\) \[4\].*available: \[8\]"):
        seg.plan(16, iseg.presets.make_settings(None, cross_weights={4: 0.7, 8: 0.3}))


def test_layers_given_by_name(sd3_pipe):
    seg = iseg.ISeg(sd3_pipe)
    backbone = seg.backbone
    z_t, t, emb = _inputs(seg)
    with torch.no_grad():
        with capture_attention(backbone.denoiser, ["transformer_blocks.0.attn:image"]) as store:
            _run(backbone, z_t, t, emb)
    assert store.names() == ["transformer_blocks.0.attn:image"] and store.mean(store.names()[0]).shape == (1, 64, 64)
    with pytest.raises(ValueError, match="not an attention layer of this SD3Transformer2DModel"):
        with capture_attention(backbone.denoiser, ["transformer_blocks.0.attn"]):
            pass
