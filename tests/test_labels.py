import json

import numpy as np
import pytest
import torch

import iseg
from iseg import labels as L
from iseg.commands import main as cli
from iseg.evaluation import label_thresholds as LT
from iseg.evaluation.datasets import COCO_CLASSES
from iseg.prompts import PromptTooLongError
from iseg.shapes import CLASSES, SPLITS, sample
from iseg.shapes.dataset import ShapesDataset

LABEL_F1_FLOOR = 0.90


@pytest.fixture(scope="module")
def seg_ref(tiny_pipe):
    return iseg.ISeg(tiny_pipe, preset="ovs-coco")  # the reference prompt: prefix, extra and background words


@pytest.fixture(scope="module")
def shapes_seg(shapes_pipe):
    return iseg.ISeg(shapes_pipe)


def test_chunking_80_coco_names_keeps_every_class_once_and_fills_each_prompt(seg_ref):
    chunks = L.chunk_vocabulary(seg_ref, COCO_CLASSES)
    assert len(chunks) >= 2
    assert [c for chunk in chunks for c in chunk] == list(COCO_CLASSES)
    for k, chunk in enumerate(chunks):
        seg_ref.prompt_for(chunk)  # fits
        if k + 1 < len(chunks):  # greedy: one more class would not fit
            with pytest.raises(PromptTooLongError):
                seg_ref.prompt_for(list(chunk) + [chunks[k + 1][0]])
    assert L.chunk_vocabulary(seg_ref, ["cat", "dog"]) == [("cat", "dog")]
    with pytest.raises(PromptTooLongError):
        L.chunk_vocabulary(seg_ref, ["cat", " ".join(["very"] * 80)])
    with pytest.raises(ValueError, match="duplicate"):
        L.chunk_vocabulary(seg_ref, ["cat", "dog", "cat"])


def test_selection_rule_by_hand():
    ev = {"cat": {"share": 0.20, "relative_peak": 1.0}, "dog": {"share": 0.02, "relative_peak": 0.8},
          "cow": {"share": 0.30, "relative_peak": 0.2}}
    assert L.select_by_evidence(ev, L.AttentionThresholds(0.05, 0.5)) == ["cat"]
    assert L.select_by_evidence(ev, L.AttentionThresholds(0.01, 0.5)) == ["cat", "dog"]
    assert L.select_by_evidence(ev, L.AttentionThresholds(0.0, 0.0)) == ["cat", "dog", "cow"]
    # nothing passes: the best share x peak is kept (cat 0.2 > cow 0.06 > dog 0.016)
    assert L.select_by_evidence(ev, L.AttentionThresholds(0.5, 0.5)) == ["cat"]
    assert L.select_by_evidence(ev, L.AttentionThresholds(0.5, 0.5, min_labels=2)) == ["cat", "cow"]
    assert L.select_by_evidence(ev, L.AttentionThresholds(0.5, 0.5, min_labels=0)) == []


def test_label_scores_and_threshold_search_by_hand():
    s = LT.label_scores([["a", "b"], ["c"]], [["a"], ["c", "d"]])
    assert (s["correct"], s["predicted"], s["ground_truth"]) == (2, 3, 3)
    assert s["precision"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(2 / 3)
    # separable evidence: present classes have share >= 0.1 and peak 1, absent ones share 0.02
    evidence, truth = [], []
    rng = np.random.default_rng(0)
    for _ in range(20):
        present = set(rng.choice(["a", "b", "c"], size=rng.integers(1, 3), replace=False))
        evidence.append({c: {"share": 0.1 + rng.random() if c in present else 0.02, "relative_peak": 1.0}
                         for c in "abc"})
        truth.append(sorted(present))
    th, score = LT.choose_thresholds(evidence, truth)
    assert score["f1"] == 1.0 and 0.02 < th.min_share <= 0.1


def test_threshold_search_finds_a_peak_cut_below_the_even_grid():
    """Relative peaks of absent classes can lie far under 0.025, the first step of an even grid: the
    search follows the evidence's quantiles too. Here shares cannot tell present from absent and
    only a peak cut between 0.01 and 0.02 can; the even grid alone reached F1 0.86 at best."""
    evidence, truth = [], []
    for k in range(10):
        b_present = k % 2 == 0
        evidence.append({"a": {"share": 0.5, "relative_peak": 1.0},
                         "b": {"share": 0.3, "relative_peak": 0.02 if b_present else 0.01}})
        truth.append(["a", "b"] if b_present else ["a"])
    th, score = LT.choose_thresholds(evidence, truth)
    assert score["f1"] == 1.0 and 0.01 < th.min_peak <= 0.02
    assert LT.label_scores([L.select_by_evidence(ev, th) for ev in evidence], truth)["f1"] == 1.0
    with pytest.raises(ValueError, match="at least one labelled image"):
        LT.choose_thresholds([], [])


def test_attention_evidence_matches_the_observation(shapes_seg):
    import torch.nn.functional as F

    from iseg.images import to_original

    rec = sample(SPLITS["val"][3])
    ev = L.attention_evidence(shapes_seg, [rec.image], CLASSES)[0]
    assert list(ev) == list(CLASSES)
    assert max(v["relative_peak"] for v in ev.values()) == 1.0
    obs = shapes_seg.observe(rec.image, list(CLASSES))[0]
    foreground = shapes_seg.decode(obs).labels > 0
    assert sum(v["share"] for v in ev.values()) == pytest.approx(foreground.mean(), abs=1e-9)
    # the raw map of "star" by hand: mean over its tokens, 8x8 upsampled, mixed with the preset weights
    k = CLASSES.index("star")
    span = list(obs.prompt.spans[k])
    w = obs.weights
    by_hand = 0
    for r in w:
        m = obs.cross[r][:, span].mean(1).reshape(1, 1, r, r)
        m = F.interpolate(m, size=(obs.grid, obs.grid), mode="bilinear", align_corners=False) if r != obs.grid else m
        by_hand = by_hand + w[r] / sum(w.values()) * m[0, 0]
    raw = L.raw_class_maps(obs)
    np.testing.assert_allclose(raw[k].numpy(), by_hand.numpy(), rtol=1e-5)
    assert ev["star"]["peak"] == pytest.approx(float(by_hand.max()), rel=1e-5)
    winner = to_original(raw, obs.geometry, obs.size).argmax(0).numpy()
    assert ev["star"]["share"] == pytest.approx(float(((winner == k) & foreground).mean()))


def test_attention_prediction_is_deterministic_and_segment_uses_it(shapes_seg):
    images = [sample(s).image for s in SPLITS["test"][:6]]
    a = L.predict_labels(images, CLASSES, "attention", seg=shapes_seg)
    b = L.predict_labels(images, CLASSES, "attention", seg=shapes_seg)
    assert a == b and len(a) == 6
    for names in a:
        assert names and names == [c for c in CLASSES if c in names]
    # open-vocabulary segment: predict, then segment into the predicted classes
    results = shapes_seg.segment(images[:2], vocabulary=CLASSES)
    assert [list(r.classes) for r in results] == a[:2]
    direct = shapes_seg.segment(images[:2], a[:2])
    for r, d in zip(results, direct):
        np.testing.assert_array_equal(r.labels, d.labels)
    with pytest.raises(TypeError, match="vocabulary"):
        shapes_seg.segment(images[0])
    with pytest.raises(TypeError, match="not both"):
        shapes_seg.segment(images[0], ["circle"], vocabulary=CLASSES)
    with pytest.raises(ValueError, match="needs seg"):
        L.predict_labels(images, CLASSES, "attention")
    with pytest.raises(ValueError, match="unknown label method"):
        L.predict_labels(images, CLASSES, "magic", seg=shapes_seg)


def test_file_method_json_csv_and_errors(tmp_path):
    vocab = ["cat", "dog", "cow"]
    p = tmp_path / "labels.json"
    p.write_text(json.dumps({"a": ["dog", "cat"], "b": ["cow"]}))
    paths = [tmp_path / "a.jpg", tmp_path / "b.png"]
    assert L.predict_labels(paths, vocab, "file", labels_file=p) == [["cat", "dog"], ["cow"]]
    assert L.predict_labels(["x", "y"], vocab, "file", labels_file=p, ids=["b", "a"]) == [["cow"], ["cat", "dog"]]
    c = tmp_path / "labels.csv"
    c.write_text("id,labels\na,cow;dog\nb,cat\n")
    assert L.predict_labels(paths, vocab, "file", labels_file=c) == [["dog", "cow"], ["cat"]]
    with pytest.raises(ValueError, match="no entry for image"):
        L.predict_labels([tmp_path / "zzz.jpg"], vocab, "file", labels_file=p)
    p.write_text(json.dumps({"a": ["dgo"]}))
    with pytest.raises(ValueError, match="'a'.*did you mean 'dog'"):
        L.predict_labels(paths[:1], vocab, "file", labels_file=p)
    with pytest.raises(FileNotFoundError):
        L.predict_labels(paths, vocab, "file", labels_file=tmp_path / "none.json")
    with pytest.raises(ValueError, match="not a file path"):
        L.predict_labels([np.zeros((8, 8, 3))], vocab, "file", labels_file=c)
    # a table already read (what iseg eval passes, batch by batch): the same answers, no file read again
    table = {"a": ("cat", "dog"), "b": ("cow",)}
    assert L.predict_labels(["x", "y"], vocab, "file", labels_file=table, ids=["b", "a"]) == [["cow"], ["cat", "dog"]]
    with pytest.raises(ValueError, match=r"^the labels has no entry for image\(s\) \['z'\]"):
        L.predict_labels(["x"], vocab, "file", labels_file=table, ids=["z"])


# -- CLIP ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    import tiny
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(folder)
    tiny.clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_method_end_to_end_with_a_tiny_random_clip(tiny_clip_folder):
    tagger = L.load_clip(tiny_clip_folder, device="cpu")
    images = [sample(s).image for s in SPLITS["test"][:3]]
    probs = tagger.probabilities(images, CLASSES)
    assert probs.shape == (3, 6)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    # the same numbers by hand: mean of unit text embeddings over templates, cosine, scale, softmax
    with torch.no_grad():
        tok = tagger.tokenizer([t.format("star") for t in L.CLIP_TEMPLATES], padding=True, return_tensors="pt")
        t = L.clip._unit(L.clip._features(tagger.model.get_text_features(**tok)))
        star = L.clip._unit(t.mean(0))
        px = tagger.image_processor(images=images[:1], return_tensors="pt")["pixel_values"]
        img = L.clip._unit(L.clip._features(tagger.model.get_image_features(pixel_values=px)))[0]
    text = tagger.text_features(CLASSES)
    np.testing.assert_allclose(text[CLASSES.index("star")].numpy(), star.numpy(), atol=1e-5)
    logits = tagger.model.logit_scale.exp() * (text @ img)
    np.testing.assert_allclose(probs[0], logits.softmax(-1).detach().numpy(), atol=1e-5)
    predicted = L.predict_labels(images, CLASSES, "clip", clip=tagger)
    assert predicted == tagger(images, CLASSES) == L.predict_labels(images, CLASSES, "clip", clip=str(tiny_clip_folder))
    for names, p in zip(predicted, probs):
        assert names == [c for c, q in zip(CLASSES, p) if q >= tagger.relative_threshold * p.max()]


def test_clip_text_features_from_two_threads_tokenize_one_at_a_time(tiny_clip_folder):
    import threading
    import time

    tagger = L.load_clip(tiny_clip_folder, device="cpu")
    alone = {v: tagger.text_features(v).clone() for v in (("star", "circle"), ("heart", "cross", "square"))}

    class Watched:  # the tokenizer, slowed down, counting how many threads are inside it at once
        def __init__(self, tokenizer):
            self.tokenizer, self.inside, self.most = tokenizer, 0, 0

        def __call__(self, *args, **kwargs):
            self.inside += 1
            self.most = max(self.most, self.inside)
            time.sleep(0.02)
            try:
                return self.tokenizer(*args, **kwargs)
            finally:
                self.inside -= 1

    tagger.tokenizer, tagger._text_cache = Watched(tagger.tokenizer), {}
    got = {}
    threads = [threading.Thread(target=lambda v=v: got.__setitem__(v, tagger.text_features(v))) for v in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tagger.tokenizer.most == 1
    for v in alone:
        assert torch.allclose(got[v], alone[v], atol=1e-6)


def test_clip_selection_rule_by_hand():
    tagger = L.ClipTagger.__new__(L.ClipTagger)
    tagger.relative_threshold, tagger.min_labels = 0.5, 1
    assert tagger.select(np.array([0.1, 0.5, 0.3, 0.1]), list("abcd")) == ["b", "c"]
    tagger.relative_threshold = 0.9
    assert tagger.select(np.array([0.1, 0.5, 0.3, 0.1]), list("abcd")) == ["b"]
    tagger.min_labels = 2
    assert tagger.select(np.array([0.1, 0.5, 0.3, 0.1]), list("abcd")) == ["b", "c"]


def test_missing_clip_weights_give_the_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(iseg.ModelNotAvailableError, match="Ways out"):
        L.load_clip("openai/clip-vit-base-patch16")
    with pytest.raises(iseg.ModelNotAvailableError, match="no config.json"):
        L.load_clip(tmp_path)
    assert not L.clip_available("openai/clip-vit-base-patch16")


def test_ovs_evaluation_with_predicted_labels(tmp_path, tiny_clip_folder):
    from iseg.evaluation import run as ev

    ds = ShapesDataset(split="test", count=8)
    seg = iseg.ISeg(iseg.loading.load_pipeline("shapes", device="cpu", verbose=False), batch_size=4)
    m = ev.evaluate_dataset(seg, ds, "ovs", label_method="attention", out=tmp_path / "att", progress=False)
    assert m["label_source"] == "attention"
    records = ev.load_records(tmp_path / "att")
    predicted = [records[i]["classes"] for i in ds.ids]
    assert predicted == L.predict_labels([ds.load(i).image for i in ds.ids], CLASSES, "attention", seg=seg)
    truth = [list(ds.load(i).classes) for i in ds.ids]
    s = LT.label_scores(predicted, truth)
    assert m["labels"]["precision"] == pytest.approx(s["precision"], abs=1e-4)
    assert m["labels"]["f1"] == pytest.approx(s["f1"], abs=1e-4)
    rc = cli.main(["eval", "--task", "ovs", "--dataset", "shapes", "--limit", "4", "--label-method", "clip", "--clip-model",
                  str(tiny_clip_folder), "--out", str(tmp_path / "clip"), "--no-progress", "--device", "cpu"])
    assert rc == 0
    m = json.loads((tmp_path / "clip" / "metrics.json").read_text())
    assert m["label_source"] == "clip" and m["counts"]["images"] == 4 and "labels" in m


def test_attention_labels_on_50_test_images_stay_above_a_floor(shapes_seg):
    """Measured with the shipped model and its thresholds on test seeds 2,000,000-2,000,049 (see
    the model card for 500 images): the floor sits a few points under."""
    records = [sample(s) for s in SPLITS["test"][:50]]
    predicted = L.predict_labels([r.image for r in records], CLASSES, "attention", seg=shapes_seg)
    truth = [[c for c in CLASSES if c in r.classes] for r in records]
    assert LT.label_scores(predicted, truth)["f1"] >= LABEL_F1_FLOOR


def test_thresholds_chosen_for_miou_can_differ_from_those_for_f1():
    # Two images; "b" is present in neither. Image 0 shows "b" weak evidence (share 0.2, peak
    # 0.6), image 1 misses "a" with weak evidence. Here a spurious "b" costs the segmentation
    # much more than a missed "a", so the mIoU choice must drop "b" even at the price of "a".
    evidence = [
        {"a": {"share": 0.5, "peak": 1.0, "relative_peak": 1.0}, "b": {"share": 0.2, "peak": 0.6, "relative_peak": 0.6}},
        {"a": {"share": 0.2, "peak": 0.6, "relative_peak": 0.6}, "c": {"share": 0.5, "peak": 1.0, "relative_peak": 1.0}},
    ]
    truth = [["a"], ["a", "c"]]
    calls = []

    def confusion_of(i, classes):
        calls.append((i, tuple(classes)))
        good = np.diag([10, 10, 0, 10])
        if "b" in classes:  # the spurious class takes every object pixel
            return np.array([[10, 0, 0, 0], [0, 0, 10, 0], [0, 0, 0, 0], [0, 0, 0, 10]])
        return good if "a" in classes or i == 0 else np.array([[10, 0, 0, 0], [1, 9, 0, 0], [0, 0, 0, 0], [0, 0, 0, 10]])

    th, best = LT.choose_thresholds_by_miou(evidence, confusion_of)
    picked = [L.select_by_evidence(ev, th) for ev in evidence]
    assert "b" not in picked[0] and picked[1] == ["c"]
    assert len(calls) == len(set(calls))  # each distinct class list segmented once
    f1_th, _ = LT.choose_thresholds(evidence, truth)
    assert [L.select_by_evidence(ev, f1_th) for ev in evidence] != picked
    assert 0 < best <= 100
