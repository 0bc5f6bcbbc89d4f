"""The FLUX family on a tiny FLUX-shaped pipeline built from configs: conditioning equals
diffusers' own (T5 rows, pooled CLIP), Cat-Cross touches exactly the class tokens' T5 rows, noise
follows the flow formula, the denoiser gets what ``FluxPipeline.__call__`` gives it, the capture
processor returns what ``FluxAttnProcessor`` returns and records what a hand computation (with
the rotary embedding) gives in a double- and a single-stream block, and the method runs end to end."""

import json

import numpy as np
import pytest
import tiny
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from family_checks import (
    assert_batch_equals_single_with_clustering,
    assert_encode_inverts_decoding,
    assert_flow_matching_noise,
    assert_prompt_session_runs_the_denoiser_once,
    assert_segments_alike,
)

import iseg
from iseg.backbones import FluxBackbone, family_of
from iseg.backbones.flux import FluxCaptureProcessor
from iseg.capture import capture_attention
from iseg.prompts import class_token_spans

T5_ROWS = 64  # the tiny T5 tokenizer's window (FLUX.1: 512)
DOUBLE, SINGLE = "transformer_blocks.0.attn", "single_transformer_blocks.0.attn"


@pytest.fixture(scope="module")
def flux_pipe():
    return tiny.tiny_flux_pipeline(seed=0)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _inputs(seg, classes=("cat",)):
    emb = seg.embedding(seg.prompt_for(list(classes)), 1.6)
    z_t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    return z_t, torch.tensor([400]), emb


def _run(pipe, z_t, t, emb):
    """The transformer called as ``FluxPipeline.__call__`` calls it."""
    b, c, h, w = z_t.shape
    return pipe.transformer(
        hidden_states=pipe._pack_latents(z_t, b, c, h, w), timestep=t.float() / 1000,
        guidance=torch.full([b], 3.5), pooled_projections=emb[:, -1, :32], encoder_hidden_states=emb[:, :-1],
        txt_ids=torch.zeros(emb.shape[1] - 1, 3), img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
        return_dict=False)[0]


def test_family_sizes_and_layers(flux_pipe):
    assert family_of(flux_pipe) == "flux"
    seg = iseg.ISeg(flux_pipe)
    assert isinstance(seg.backbone, FluxBackbone) and seg.model.family == "flux"
    # default_sample_size 16 latent cells x VAE factor 2; sides step by VAE factor x 2 (the packing)
    assert (seg.backbone.native_size, seg.backbone.size_step(), seg.backbone.latent_scale) == (32, 4, 2)
    assert seg.backbone.tokenizer is flux_pipe.tokenizer_2 and seg.backbone.tokenizer.model_max_length == T5_ROWS
    layers = seg.backbone.attention_layers()
    assert [layer.name for layer in layers] == [DOUBLE + ":text", DOUBLE + ":image", SINGLE + ":text", SINGLE + ":image"]
    assert {layer.kind for layer in layers[::2]} == {"cross"} and {layer.kind for layer in layers[1::2]} == {"self"}
    assert all(layer.module == layer.name.split(":")[0] and layer.heads == 2 and layer.level == 1 for layer in layers)
    assert all(layer.resolution(16) == 8 for layer in layers)
    plan = seg.plan(16)
    # one packed grid (latent / 2): cross-attention weight 1 there, self-attention read there
    assert dict(plan.weights) == {8: 1.0} and plan.self_resolution == 8
    assert [layer.name for layer in plan.cross[8]] == [layers[0].name, layers[2].name]
    assert [layer.name for layer in plan.self_layers] == [layers[1].name, layers[3].name]
    named = seg.plan(16, seg.with_settings(cross_layers=("single_transformer_blocks",), self_layers=(DOUBLE,)))
    assert [layer.name for layer in named.cross[8]] == [SINGLE + ":text"]
    assert [layer.name for layer in named.self_layers] == [DOUBLE + ":image"]


def test_the_native_size_follows_the_pipelines_default_sample_size(flux_pipe):
    seg = iseg.ISeg(flux_pipe)
    before = flux_pipe.default_sample_size
    flux_pipe.default_sample_size = 128  # FLUX.1's: 128 latent cells
    try:
        assert seg.backbone.native_size == 256  # x the tiny VAE's factor 2; FLUX.1's VAE (x8): 1024
    finally:
        flux_pipe.default_sample_size = before


def test_the_t5_window_is_the_pipelines_max_sequence_length(flux_pipe):
    # a T5 tokenizer with a longer (or unset) window reads the pipeline's 512 rows; the pipeline's
    # own tokenizer is left as it is
    tok = flux_pipe.tokenizer_2
    tok.model_max_length = 10**30
    try:
        backbone = FluxBackbone(flux_pipe)
        assert backbone.tokenizer is not tok and backbone.tokenizer.model_max_length == 512
        assert tok.model_max_length == 10**30
    finally:
        tok.model_max_length = T5_ROWS


def test_t5_class_spans(flux_pipe):
    tok = flux_pipe.tokenizer_2
    text = "a photograph of cat and motorbike and other object"
    ids, spans = class_token_spans(tok, text, ["cat", "motorbike"], offsets=[16, 24])
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[-1] == "</s>" and pieces[0] == "▁a"  # no start token, the end token last
    assert [pieces[i] for i in spans[0]] == ["▁cat"]
    assert [pieces[i] for i in spans[1]] == ["▁moto", "r", "bi", "ke"]
    assert class_token_spans(tok, text, ["cat", "motorbike"])[1] == spans  # searched in order: the same
    seg = iseg.ISeg(flux_pipe)
    prompt = seg.prompt_for(["cat", "potted plant"])
    assert len(prompt.input_ids) == T5_ROWS and prompt.input_ids[-1] == tok.pad_token_id
    got = [tok.convert_ids_to_tokens([prompt.input_ids[i] for i in span]) for span in prompt.spans]
    assert got == [["▁cat"], ["▁pot", "ted", "▁plant"]]
    with pytest.raises(iseg.prompts.UnknownWordError):
        seg.prompt_for(["cat", "xyz!"])


def test_conditioning_equals_the_pipelines_own(flux_pipe):
    seg = iseg.ISeg(flux_pipe)
    prompt = seg.prompt_for(["cat", "dog"])
    ours = seg.backbone.encode_text(prompt)  # (1, 64 + 1, 32)
    embeds, pooled, text_ids = flux_pipe.encode_prompt(prompt.text, prompt_2=None, device="cpu",
                                                       max_sequence_length=T5_ROWS)
    assert ours.shape == (1, T5_ROWS + 1, 32) and embeds.shape == (1, T5_ROWS, 32)
    assert torch.allclose(ours[:, :-1], embeds, atol=1e-5)
    assert torch.allclose(ours[0, -1], pooled[0], atol=1e-5)  # CLIP's pooled output, width 32
    assert text_ids.shape == (T5_ROWS, 3) and not text_ids.any()


def test_cat_cross_scales_the_class_tokens_t5_rows_only(flux_pipe):
    seg = iseg.ISeg(flux_pipe)
    prompt = seg.prompt_for(["cat", "potted plant"])
    plain, scaled = seg.embedding(prompt, 1.0), seg.embedding(prompt, 1.6)
    classes = sorted({i for span in prompt.spans for i in span})
    assert len(classes) == 4 and max(classes) < T5_ROWS
    others = [i for i in range(plain.shape[1]) if i not in classes]
    assert torch.allclose(scaled[0, classes], 1.6 * plain[0, classes])
    assert torch.equal(scaled[0, others], plain[0, others])  # other T5 tokens, padding, the pooled row
    assert others[-1] == T5_ROWS


def test_noise_is_the_flow_matching_interpolation(flux_pipe):
    assert_flow_matching_noise(flux_pipe, channels=4)


def test_encode_is_the_inverse_of_the_pipelines_decoding(flux_pipe):
    assert_encode_inverts_decoding(flux_pipe, channels=4)



def test_denoise_calls_the_transformer_as_the_pipeline_does(flux_pipe):
    seg = iseg.ISeg(flux_pipe)
    z_t, t, emb = _inputs(seg)
    seen = {}
    hook = flux_pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            seg.backbone.denoise(z_t, t, emb)
    finally:
        hook.remove()
    assert torch.equal(seen["hidden_states"], flux_pipe._pack_latents(z_t, 1, 4, 16, 16))
    assert seen["hidden_states"].shape == (1, 64, 16)
    assert torch.allclose(seen["timestep"], torch.tensor([0.4]))  # sigma: the transformer multiplies by 1000
    assert torch.equal(seen["guidance"], torch.tensor([3.5]))
    assert torch.equal(seen["img_ids"], flux_pipe._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32))
    assert torch.equal(seen["txt_ids"], torch.zeros(T5_ROWS, 3))
    assert torch.equal(seen["encoder_hidden_states"], emb[:, :-1])
    assert torch.equal(seen["pooled_projections"], emb[:, -1])
    # a transformer without guidance embedding (FLUX.1-schnell) gets none
    flux_pipe.transformer.register_to_config(guidance_embeds=False)
    try:
        backbone = FluxBackbone(flux_pipe)
        assert backbone._positions(8, 8, T5_ROWS, 1, z_t)[2] is None
    finally:
        flux_pipe.transformer.register_to_config(guidance_embeds=True)


def test_capture_returns_what_the_flux_processor_returns(flux_pipe):
    seg = iseg.ISeg(flux_pipe)
    backbone = seg.backbone
    assert all(isinstance(p, FluxAttnProcessor) for p in backbone.denoiser.attn_processors.values())
    z_t, t, emb = _inputs(seg)
    with torch.no_grad():
        plain = _run(flux_pipe, z_t, t, emb)
        with capture_attention(backbone.denoiser, backbone.attention_layers()) as store:
            assert all(isinstance(p, FluxCaptureProcessor) for p in backbone.denoiser.attn_processors.values())
            captured = _run(flux_pipe, z_t, t, emb)
    assert all(isinstance(p, FluxAttnProcessor) for p in backbone.denoiser.attn_processors.values())
    assert not any(block._forward_pre_hooks for block in backbone.denoiser.single_transformer_blocks)
    assert torch.allclose(plain, captured, atol=1e-5)
    assert (plain - captured).abs().max() == 0  # the same code path: the same numbers
    for name in store.names("cross"):
        assert store.mean(name).shape == (1, 64, T5_ROWS)
        assert torch.allclose(store.mean(name).sum(-1), torch.tensor(1.0), atol=1e-5)
    for name in store.names("self"):
        assert store.mean(name).shape == (1, 64, 64)
        assert torch.allclose(store.mean(name).sum(-1), torch.tensor(1.0), atol=1e-5)
    assert store.by_resolution("cross")[8].shape == (1, 64, T5_ROWS)
    assert store.by_resolution("self")[8].shape == (1, 64, 64)


def _call_kwargs(pipe, attn, z_t, t, emb) -> dict:
    """The keyword arguments one attention module is called with in a forward pass."""
    seen = {}
    hook = attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            _run(pipe, z_t, t, emb)
    finally:
        hook.remove()
    return seen


def _hand(pipe, z_t, t, emb, module: str):
    """(B, heads, image queries, image keys) and (..., text keys) of one attention module: the
    softmax over the joint [text; image] keys with the rotary embedding applied to the queries and
    keys, each part renormalised over its keys (in float64)."""
    attn = pipe.transformer.get_submodule(module)
    seen = _call_kwargs(pipe, attn, z_t, t, emb)
    x, c, (cos, sin) = seen["hidden_states"], seen.get("encoder_hidden_states"), seen["image_rotary_emb"]
    n_text = emb.shape[1] - 1

    def heads(y):
        return y.view(1, -1, attn.heads, 16)

    with torch.no_grad():
        q, k = attn.norm_q(heads(attn.to_q(x))), attn.norm_k(heads(attn.to_k(x)))
        if c is not None:  # double stream: the text tokens come first
            q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(c))), q], dim=1)
            k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(c))), k], dim=1)
        assert q.shape[1] == n_text + 64
        q = apply_rotary_emb(q, (cos, sin), sequence_dim=1).transpose(1, 2).double()
        k = apply_rotary_emb(k, (cos, sin), sequence_dim=1).transpose(1, 2).double()
        p = (q[:, :, n_text:] @ k.transpose(-1, -2) * 16**-0.5).softmax(-1)
    text, image = p[..., :n_text], p[..., n_text:]
    return image / image.sum(-1, keepdim=True), text / text.sum(-1, keepdim=True)


@pytest.mark.parametrize("module", [DOUBLE, SINGLE])
def test_captured_probabilities_equal_a_hand_computation(flux_pipe, module, monkeypatch):
    seg = iseg.ISeg(flux_pipe)
    backbone = seg.backbone
    z_t, t, emb = _inputs(seg, ("cat", "dog"))
    image, text = _hand(flux_pipe, z_t, t, emb, module)
    layers = [layer for layer in backbone.attention_layers() if layer.module == module]
    with torch.no_grad():
        with capture_attention(backbone.denoiser, layers, per_head=True) as heads:
            _run(flux_pipe, z_t, t, emb)
        with capture_attention(backbone.denoiser, layers) as means:
            _run(flux_pipe, z_t, t, emb)
        picked = {layers[0].name: [1], layers[1].name: [0, 1]}
        with capture_attention(backbone.denoiser, layers, heads=picked) as some:
            _run(flux_pipe, z_t, t, emb)
        monkeypatch.setattr(FluxCaptureProcessor, "ALL_HEADS_BYTES", 0)  # one head at a time
        with capture_attention(backbone.denoiser, layers, heads=picked) as one_by_one:
            _run(flux_pipe, z_t, t, emb)
    text_name, image_name = module + ":text", module + ":image"
    assert torch.allclose(heads.heads(text_name).double(), text, atol=1e-5)
    assert torch.allclose(heads.heads(image_name).double(), image, atol=1e-5)
    assert torch.allclose(means.mean(text_name).double(), text.mean(1), atol=1e-5)
    assert torch.allclose(means.mean(image_name).double(), image.mean(1), atol=1e-5)
    assert torch.allclose(some.mean(text_name).double(), text[:, 1], atol=1e-5)
    assert torch.allclose(some.mean(image_name).double(), image.mean(1), atol=1e-5)
    assert torch.allclose(one_by_one.mean(text_name), some.mean(text_name), atol=1e-6)
    assert torch.allclose(one_by_one.mean(image_name), some.mean(image_name), atol=1e-6)


def test_the_rotary_embedding_matters(flux_pipe):
    # without the rotation the maps differ: the capture does not skip it
    seg = iseg.ISeg(flux_pipe)
    z_t, t, emb = _inputs(seg)
    image, _ = _hand(flux_pipe, z_t, t, emb, SINGLE)
    attn = flux_pipe.transformer.get_submodule(SINGLE)
    seen = _call_kwargs(flux_pipe, attn, z_t, t, emb)
    with torch.no_grad():
        x = seen["hidden_states"]
        q = attn.norm_q(attn.to_q(x).view(1, -1, 2, 16)).transpose(1, 2).double()
        k = attn.norm_k(attn.to_k(x).view(1, -1, 2, 16)).transpose(1, 2).double()
        p = (q[:, :, T5_ROWS:] @ k[:, :, T5_ROWS:].transpose(-1, -2) * 0.25).softmax(-1)
    assert (p - image).abs().max() > 1e-3


def test_a_single_stream_processor_without_its_text_length_refuses(flux_pipe):
    from iseg.capture import AttentionStore

    attn = flux_pipe.transformer.get_submodule(SINGLE)
    processor = FluxCaptureProcessor(AttentionStore(), {"cross": SINGLE + ":text"})
    with pytest.raises(RuntimeError, match="text length"):
        processor(attn, torch.randn(1, 8, 32))


def test_batch_equals_single_with_clustering(flux_pipe):
    assert_batch_equals_single_with_clustering(iseg.ISeg(flux_pipe, iterations=3), [_image(i) for i in range(4)])


def test_segment_trace_and_session_end_to_end(flux_pipe):
    seg = iseg.ISeg(flux_pipe, iterations=3, clustering=False)
    images = [_image(1), _image(2)]
    both = assert_segments_alike(seg, images)
    assert both[0].maps.shape == (4, 2, 8, 8) and both[0].labels.shape == (32, 32)
    trace = seg.trace(images[0], ["cat"])
    assert {layer.kind for layer in trace.layers()} == {"self", "cross"}
    assert trace.class_map(SINGLE + ":text", "cat").shape == (8, 8)
    assert trace.store.heads(SINGLE + ":image").shape == (1, 2, 64, 64)
    assert_prompt_session_runs_the_denoiser_once(seg, flux_pipe.transformer, images[0])


def test_load_model_reads_the_family_from_model_index(flux_pipe, tmp_path):
    flux_pipe.save_pretrained(tmp_path / "flux")
    model = iseg.load_model(tmp_path / "flux", device="cpu", verbose=False)
    assert model.family == "flux" and type(model.pipe).__name__ == "FluxPipeline"
    index = json.loads((tmp_path / "flux" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    # the loaded pipeline has FLUX.1's default_sample_size (128: 256 here); a 64 side is in range
    seg = iseg.ISeg(model, iterations=1, image_size=64)
    assert seg.backbone.native_size == 256
    assert seg.backbone.tokenizer.model_max_length == T5_ROWS
    assert seg.segment(_image(3), ["cat"]).labels.shape == (32, 32)


def test_compiled_forward_gives_the_plain_maps_and_gives_the_processors_back(flux_pipe):
    # torch.compile (aot_eager: no C++ toolchain needed) around the capture changes no map
    seg = iseg.ISeg(flux_pipe, iterations=3, clustering=False)
    images, classes = [_image(5), _image(6)], ["cat", "dog"]
    plain = seg.segment(images, classes)
    seg.compile("torch", backend="aot_eager")
    try:
        fast = seg.segment(images, classes)
        assert all(isinstance(p, FluxCaptureProcessor) for p in flux_pipe.transformer.attn_processors.values())
    finally:
        seg.compile(None)
    assert all(isinstance(p, FluxAttnProcessor) for p in flux_pipe.transformer.attn_processors.values())
    assert not any(block._forward_pre_hooks for block in flux_pipe.transformer.single_transformer_blocks)
    for p, f in zip(plain, fast):
        assert np.allclose(p.maps, f.maps, atol=1e-4) and np.array_equal(p.labels, f.labels)


def test_a_resolution_off_the_packed_grid_is_refused(flux_pipe):
    with pytest.raises(ValueError, match=r"cross_weights=\{4: 0.7, 8: 0.3\} asks for attention layers .*no cross-attention "
                                         r"at resolution\(s\) \[4\].*available: \[8\]"):
        iseg.ISeg(flux_pipe, cross_weights={4: 0.7, 8: 0.3})   # refused when made, not at the first image
    with pytest.raises(ValueError, match=r"no cross-attention at resolution\(s\) \[4\].*available: \[8\]"):
        iseg.ISeg(flux_pipe).plan(16, iseg.presets.make_settings(None, cross_weights={4: 0.7, 8: 0.3}))


def test_layers_given_by_name(flux_pipe):
    seg = iseg.ISeg(flux_pipe)
    backbone = seg.backbone
    z_t, t, emb = _inputs(seg)
    with torch.no_grad():
        with capture_attention(backbone.denoiser, [SINGLE + ":image"]) as store:
            _run(flux_pipe, z_t, t, emb)
    assert store.names() == [SINGLE + ":image"] and store.mean(store.names()[0]).shape == (1, 64, 64)
    with pytest.raises(ValueError, match="not an attention layer of this FluxTransformer2DModel"):
        with capture_attention(backbone.denoiser, [SINGLE]):
            pass
