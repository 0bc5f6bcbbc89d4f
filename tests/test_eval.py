import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fake_datasets import make_coco164k, make_coco2014, make_context, make_voc
from PIL import Image

import iseg
from iseg.commands import main as cli
from iseg.evaluation import run as ev
from iseg.evaluation.datasets import open_dataset
from iseg.evaluation.metrics import confusion, miou
from iseg.shapes.dataset import ShapesDataset

SEEDS = list(range(2_000_000, 2_000_006))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    import tiny

    folder = tmp_path_factory.mktemp("tiny-model")
    tiny.tiny_pipeline(seed=0, sd_layout=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shapes_seg(shapes_pipe):
    return iseg.ISeg(shapes_pipe, preset="shapes", batch_size=4)


def test_default_presets_follow_method_md():
    assert ev.default_preset("voc", "wsss") == "wsss-voc"
    assert ev.default_preset("coco-object", "ovs") == "ovs-coco"
    assert ev.default_preset("context", "ovs") == "ovs-context"
    assert ev.default_split("voc", "wsss") == "train" and ev.default_split("voc", "ovs") == "val"
    assert ev.default_model("shapes") == "shapes"


def test_command_end_to_end_on_a_fake_voc_folder(tmp_path, tiny_folder):
    ids = make_voc(tmp_path / "data", SEEDS[:5])
    out = tmp_path / "run"
    rc = cli.main(["eval", "--dataset", "voc", "--root", str(tmp_path / "data"), "--split", "val", "--model", str(tiny_folder),
                  "--device", "cpu", "--out", str(out), "--no-progress", "--batch-size", "2", "--iterations", "3"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "voc" and m["task"] == "wsss" and m["preset"] == "wsss-voc"
    assert m["settings"]["iterations"] == 3 and m["settings"]["batch_size"] == 2
    assert m["counts"]["images"] == 5 and m["label_source"] == "gt"
    assert list(m["iou_per_class"]) == ["background", *iseg.evaluation.datasets.VOC_CLASSES]
    # the ground-truth pixels per class are what the fake labels hold (255 border left out)
    ds = open_dataset("voc", tmp_path / "data", "val")
    gt = np.concatenate([ds.label(i).ravel() for i in ids])
    assert m["counts"]["pixels"] == int((gt != 255).sum())
    assert m["counts"]["gt_pixels_per_class"]["cat"] == int((gt == 8).sum())
    # pseudo-masks are palette PNGs holding dataset labels, one per image; mIoU recomputed from them matches
    hist = np.zeros((21, 21), np.int64)
    for i in ids:
        png = Image.open(out / "masks" / f"{i}.png")
        assert png.mode == "P"
        pred = np.array(png)
        assert set(np.unique(pred)) <= {0} | {ds.class_index(c) for c in ds.load(i).classes}
        hist += confusion(pred, ds.label(i), 21)
    assert m["miou"] == pytest.approx(100 * miou(hist), abs=1e-3)
    assert m["miou_defined"] == pytest.approx(100 * miou(hist, "defined"), abs=1e-3)
    assert "| mIoU (classes present in the ground truth) |" in (out / "results.md").read_text()


def test_compile_options_reach_the_segmenter_and_cuda_graphs_on_a_cpu_are_refused(tmp_path, tiny_folder, monkeypatch,
                                                                                  capsys):
    make_voc(tmp_path / "data", SEEDS[:2])
    base = ["--dataset", "voc", "--root", str(tmp_path / "data"), "--split", "val", "--model", str(tiny_folder),
            "--device", "cpu", "--no-progress", "--iterations", "1"]
    assert cli.main(["eval", *base, "--out", str(tmp_path / "a"), "--compile", "cuda-graph"]) == 2
    assert "--compile: CUDA graphs need the pipeline on a CUDA device" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(iseg.ISeg, "compile", lambda self, method, vae=False: calls.append((method, vae)) or self)
    assert cli.main(["eval", *base, "--out", str(tmp_path / "b"), "--compile", "torch", "--compile-vae"]) == 0
    assert calls == [("torch", True)]
    calls.clear()
    assert cli.main(["eval", *base, "--out", str(tmp_path / "c")]) == 0
    assert calls == []  # the plain path unless asked


@pytest.mark.parametrize("name,make,sub", [("context", make_context, "VOCdevkit/VOC2010"),
                                           ("coco-object", make_coco2014, "")])
def test_command_end_to_end_on_fake_context_and_coco_folders(tmp_path, tiny_folder, name, make, sub):
    ids = make(tmp_path / "data", SEEDS[:3])
    out = tmp_path / "run"
    cli.main(["eval", "--dataset", name, "--root", str(tmp_path / "data" / sub), "--model", str(tiny_folder), "--device", "cpu",
             "--out", str(out), "--no-progress", "--iterations", "2", "--clustering", "false"])
    m = json.loads((out / "metrics.json").read_text())
    ds = open_dataset(name, tmp_path / "data" / sub, "val")
    assert m["dataset"] == name and m["counts"]["images"] == 3 and set(ds.ids) == set(ids)
    assert list(m["iou_per_class"])[1:] == list(ds.class_names)
    assert m["preset"] == ev.default_preset(name, "wsss")
    gt = np.concatenate([ds.label(i).ravel() for i in ds.ids])
    assert m["counts"]["pixels"] == int((gt != 255).sum())
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == sorted(ids)


def test_ovs_with_a_labels_file_reports_label_precision_and_recall(tmp_path, tiny_folder):
    make_coco164k(tmp_path / "coco", SEEDS[:3])
    ds = open_dataset("coco-object-164k", tmp_path / "coco", "val")
    first, second, third = ds.ids
    # one right, one with an extra wrong class, one missing a class
    truth = {i: ds.load(i).classes for i in ds.ids}
    table = {first: list(truth[first]), second: list(truth[second]) + ["toaster"], third: list(truth[third][1:])}
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(table))
    out = tmp_path / "run"
    cli.main(["eval", "--task", "ovs", "--dataset", "coco-object-164k", "--root", str(tmp_path / "coco"), "--model",
             str(tiny_folder), "--device", "cpu", "--labels", str(labels), "--out", str(out), "--no-progress",
             "--iterations", "2", "--clustering", "false"])
    m = json.loads((out / "metrics.json").read_text())
    n_true = sum(len(v) for v in truth.values())
    n_pred = sum(len(v) for v in table.values())
    correct = n_true - (len(truth[third]) - len(table[third]))
    assert m["labels"]["predicted"] == n_pred and m["labels"]["ground_truth"] == n_true
    assert m["labels"]["precision"] == pytest.approx(correct / n_pred, abs=1e-4)
    assert m["labels"]["recall"] == pytest.approx(correct / n_true, abs=1e-4)
    assert not (out / "masks").exists()  # OVS writes no pseudo-masks unless asked
    assert m["preset"] == "ovs-coco" and m["settings"]["background"] == "threshold"


def test_label_files_json_and_csv(tmp_path):
    ds = ShapesDataset(split="test", count=3)
    p = tmp_path / "l.csv"
    p.write_text("id,labels\n2000000,star;circle\n2000001,heart\n")
    assert ev.read_label_file(p, ds) == {"2000000": ("circle", "star"), "2000001": ("heart",)}
    p = tmp_path / "l.json"
    p.write_text(json.dumps({"2000000": ["sqare"]}))
    with pytest.raises(ValueError, match="'2000000'.*did you mean 'square'"):
        ev.read_label_file(p, ds)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ev.read_label_file(p, ds)
    p.write_text(json.dumps({"2000000": ["circle"]}))
    with pytest.raises(ValueError, match="no entry for image"):
        ev.evaluate_dataset(_FakeSeg(), ds, "ovs", labels=p, progress=False)
    with pytest.raises(ValueError, match="--labels FILE"):
        ev.evaluate_dataset(_FakeSeg(), ds, "ovs", progress=False)
    with pytest.raises(ValueError, match="ground-truth image labels"):
        ev.evaluate_dataset(_FakeSeg(), ds, "wsss", labels=p, progress=False)


def test_evaluation_takes_its_label_methods_from_predict_labels(monkeypatch, tmp_path):
    """``iseg eval`` dispatches no label method itself: every one goes through
    ``iseg.labels.predict_labels``, with the dataset's vocabulary and the images' ids."""
    import iseg.labels as labels

    ds = ShapesDataset(split="val", count=4)
    calls = []
    real = labels.predict_labels

    def recording(images, vocabulary, method="attention", **kwargs):
        calls.append((method, list(vocabulary), list(kwargs["ids"])))
        return real(images, vocabulary, method, **kwargs)

    monkeypatch.setattr(labels, "predict_labels", recording)
    table = {i: ds.load(i).classes for i in ds.ids}
    m = ev.evaluate_dataset(_FakeSeg(), ds, "ovs", labels=table, progress=False)
    assert m["label_source"] == "file"
    assert [c[0] for c in calls] == ["file", "file"] and all(c[1] == list(ds.class_names) for c in calls)
    assert [i for c in calls for i in c[2]] == list(ds.ids)  # every image once, batch by batch (batch_size 2)
    oracle = ev.evaluate_dataset(_FakeSeg(), ds, "wsss", progress=False)
    assert m["miou"] == oracle["miou"]  # the true labels from a table give the oracle's numbers
    with pytest.raises(ValueError, match=r"unknown label method 'magic'; methods: attention, clip, file, gt"):
        ev.evaluate_dataset(_FakeSeg(), ds, "ovs", label_method="magic", progress=False)
    assert len(calls) == 2  # refused before any image


class _FakeSeg:
    """Predicts every pixel as the first given class; counts what it computes."""

    preset = "fake"
    # what evaluate_dataset records of the model, its weights and its launch (ISeg's attributes)
    model = SimpleNamespace(name=None)
    backbone = SimpleNamespace(dtype=torch.float32, device=torch.device("cpu"))
    forward = SimpleNamespace(encoder=None, compiled=None)

    def __init__(self, batch_size=2):
        self.settings = iseg.make_settings(None, batch_size=batch_size)
        self.seen = []

    def segment(self, images, classes, progress=False):
        self.seen.extend(range(len(images)))

        class R:
            def __init__(self, img, names):
                self.labels = np.ones((img.height, img.width), np.int64)
                self.given_classes = tuple(names)

        return [R(im, names) for im, names in zip(images, classes)]


def test_evaluation_by_hand_on_a_fake_segmenter():
    ds = ShapesDataset(split="val", count=4)
    m = ev.evaluate_dataset(_FakeSeg(), ds, "wsss", progress=False)
    hist = np.zeros((7, 7), np.int64)
    for item in ds:
        pred = np.full(item.label.shape, ds.class_index(item.classes[0]))
        hist += confusion(pred, item.label, 7)
    assert m["miou"] == pytest.approx(100 * miou(hist), abs=1e-3)
    assert m["counts"]["images"] == 4


def test_resume_after_a_kill_gives_the_same_result_without_recomputing(tmp_path, shapes_seg, monkeypatch):
    ds = ShapesDataset(split="test", count=10)
    full = ev.evaluate_dataset(shapes_seg, ds, "wsss", out=tmp_path / "full", progress=False)
    out = tmp_path / "killed"
    calls = []
    load = ds.load

    def dying_load(i):
        calls.append(i)
        if len(calls) == 7:  # in the middle of the 2nd batch of 4
            raise KeyboardInterrupt
        return load(i)

    monkeypatch.setattr(ds, "load", dying_load)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate_dataset(shapes_seg, ds, "wsss", out=out, progress=False)
    monkeypatch.setattr(ds, "load", load)
    assert len(ev.load_records(out)) == 4
    # a kill during a write leaves a cut line: it is skipped
    part = next((out / "records").glob("*.jsonl"))
    with part.open("a") as f:
        f.write('{"id": "2000004", "hist": [[0, 0,')
    computed = []
    segment = shapes_seg.segment

    def counting_segment(images, classes, **kw):
        computed.extend(classes)
        return segment(images, classes, **kw)

    monkeypatch.setattr(shapes_seg, "segment", counting_segment)
    resumed = ev.evaluate_dataset(shapes_seg, ds, "wsss", out=out, progress=False)
    assert len(computed) == 6  # batches 2 and 3 only
    assert resumed["miou"] == full["miou"] and resumed["iou_per_class"] == full["iou_per_class"]
    assert resumed["counts"] == full["counts"]
    assert len(list((out / "masks").glob("*.png"))) == 10
    # a finished run is not recomputed at all
    computed.clear()
    ev.evaluate_dataset(shapes_seg, ds, "wsss", out=out, progress=False)
    assert computed == []


def test_other_settings_in_the_same_folder_are_refused(tmp_path, shapes_seg, capsys):
    ds = ShapesDataset(split="test", count=4)
    ev.evaluate_dataset(shapes_seg, ds, "wsss", out=tmp_path, progress=False)
    other = iseg.ISeg(shapes_seg.model.pipe, preset="shapes", batch_size=4, iterations=3)
    with pytest.raises(ev.RunMismatchError, match=r"settings.iterations \(5 there, 3 now\).*--restart"):
        ev.evaluate_dataset(other, ds, "wsss", out=tmp_path, progress=False)
    assert cli.main(["eval", "--dataset", "shapes", "--limit", "5", "--out", str(tmp_path), "--batch-size", "4",
                    "--no-progress", "--device", "cpu"]) == 2
    assert "limit (null there, 5 now)" in capsys.readouterr().err  # refused before the model loads


def test_empty_image_lists_are_refused():
    with pytest.raises(iseg.evaluation.datasets.DatasetError, match="no images"):
        ev.evaluate_dataset(_FakeSeg(), ShapesDataset(split="test", count=0), "wsss", progress=False)


def test_shapes_evaluation_reproduces_the_model_card(tmp_path):
    """The model card's figure for the first 200 test images, preset ``shapes`` (data/models/shapes/README.md;
    its 500-image headline, 90.26, is the same command with ``--limit 500``, 2.5 times as long)."""
    m = ev.evaluate_dataset(iseg.ISeg(iseg.loading.load_pipeline("shapes", device="cpu", verbose=False)),
                            ShapesDataset(split="test", count=200), "wsss", progress=False)
    # bench/cpu-spread.json: over 1-2 threads and AVX-512 / AVX2 / scalar kernels the 500-image figure moved by
    # 0.014, all of it one knife-edge image (seed 2,000,245) that lies outside these 200; the tolerance allows one
    # such image here on a CPU not measured
    assert m["miou"] == pytest.approx(90.38, abs=0.05)


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="accelerate launcher not installed")
def test_two_processes_give_exactly_the_numbers_of_one(tmp_path):
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    common = ["--dataset", "shapes", "--limit", "24", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "iseg", "eval", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "iseg", "eval", *common,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert b["timing"]["processes"] == 2 and a["timing"]["processes"] == 1
    # both processes wrote records: the work was shared
    assert len(list((tmp_path / "two" / "records").glob("part-001-*.jsonl"))) == 1
    for key in ("miou", "miou_defined", "iou_per_class", "counts"):
        assert a[key] == b[key], key
    for i in range(2_000_000, 2_000_024):
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / "one" / "masks" / f"{i}.png")),
                                      np.array(Image.open(tmp_path / "two" / "masks" / f"{i}.png")))


def test_run_facts_record_compiled_forward_passes(tiny_pipe):
    # run.json must tell a compiled run from a plain one: a compiled VAE rounds differently
    seg = iseg.ISeg(tiny_pipe)
    assert ev._run_facts(seg, "ground-truth", None)["compile"] is None
    seg.compile("torch", backend="aot_eager", vae={"backend": "aot_eager"})  # compiles at the first call only
    try:
        facts = ev._run_facts(seg, "ground-truth", None)
    finally:
        seg.compile(None)
    assert (facts["compile"], facts["compile_vae"], facts["dtype"], facts["device"]) == ("torch", True, "float32", "cpu")
