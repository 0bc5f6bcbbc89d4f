"""A small ``ISeg`` (issue #33): its public surface, the one cache, and two passes said by the plan."""

import ast
import inspect
import threading

import pytest

import iseg
from iseg.forward import Cache, LayerPlan, plan_passes


def test_iseg_keeps_the_calls_a_user_makes_and_no_more():
    tree = ast.parse(inspect.getsource(iseg.segmenter))
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "ISeg"]
    public = {node.name for node in cls.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")}
    assert len(public) <= 15 and cls.end_lineno - cls.lineno + 1 < 220
    assert {"segment", "observe", "decode", "trace", "plan", "prompt_session", "segment_prompt", "compile",
            "with_settings", "prompt_for", "embedding"} <= public
    # the steps one at a time live on the forward pass and the backbone, not on ISeg
    for name in ("encode", "noisy", "denoise", "decode_latents", "chunk_size", "compiled", "attention_kind"):
        assert hasattr(iseg.forward.NoisyForward, name) and name not in public


def test_the_cache_keeps_the_most_recent_values_and_makes_each_once():
    made = []
    cache = Cache(2)

    def make(key):
        return lambda: made.append(key) or key * 10

    assert [cache.get(k, make(k)) for k in (1, 2, 1, 3, 1, 2)] == [10, 20, 10, 30, 10, 20]
    assert made == [1, 2, 3, 2] and len(cache) == 2  # 2 was the least recently used when 3 came
    cache.clear()
    assert len(cache) == 0 and cache.get(1, make(1)) == 10 and made[-1] == 1

    # threads asking for one key at once make it once
    slow, results = Cache(4), []

    def ask():
        results.append(slow.get("k", lambda: threading.Event().wait(0.05) or object()))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in results}) == 1


def test_two_passes_are_said_by_the_plan(tiny_pipe):
    seg = iseg.ISeg(tiny_pipe)
    one = seg.plan()
    native = one.image_size
    assert isinstance(one, LayerPlan) and one.self_pass is None and one.passes == (one,) and one.self_plan is one
    assert native == seg.backbone.native_size and seg.plan() is one  # cached on the hashable settings
    two = seg.plan(settings=seg.with_settings(self_image_size=2 * native))
    first, second = two.passes
    assert first is two and second is two.self_pass is two.self_plan
    assert (first.image_size, second.image_size) == (native, 2 * native)
    # the first pass reads only cross-attention, the second only self-attention, on the finer grid
    assert first.layers() == first.layers(self_attention=False) and first.weights == one.weights
    assert second.layers() == list(second.self_layers) and not second.weights
    assert second.self_resolution == 2 * one.self_resolution
    assert plan_passes(seg.backbone, seg.with_settings(self_image_size=native)) == one  # the same size: one pass
    with pytest.raises(ValueError, match="self_image_size=12 does not suit"):
        iseg.ISeg(tiny_pipe, self_image_size=12)
