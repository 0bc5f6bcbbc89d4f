import numpy as np
import pytest
from fake_datasets import expected, make_coco164k, make_coco2014, make_context, make_voc
from PIL import Image

from iseg.evaluation.datasets import (
    COCO_CLASSES,
    CONTEXT_CLASSES,
    VOC_CLASSES,
    DatasetError,
    class_names_of,
    open_dataset,
)
from iseg.shapes import CLASSES, SPLITS, sample
from iseg.shapes.dataset import ShapesDataset

SEEDS = [2_000_003, 2_000_001, 2_000_007]  # deliberately not sorted: list order must be kept


def test_class_tables_have_the_standard_sizes():
    assert len(VOC_CLASSES) == 20 and len(CONTEXT_CLASSES) == 59 and len(COCO_CLASSES) == 80
    for table in (VOC_CLASSES, CONTEXT_CLASSES, COCO_CLASSES):
        assert len(set(table)) == len(table)
    # label order: VOC 15 = person, COCO 1 = person, 80 = toothbrush, Context 59 = wood
    assert VOC_CLASSES[15 - 1] == "person" and COCO_CLASSES[0] == "person" and COCO_CLASSES[-1] == "toothbrush"
    assert CONTEXT_CLASSES[-1] == "wood" and CONTEXT_CLASSES[0] == "aeroplane"
    assert class_names_of("shapes") == tuple(CLASSES)


def _check(ds, ids: dict, kind: str):
    assert ds.ids == list(ids)
    for i, seed in ids.items():
        item = ds.load(i)
        label, classes = expected(seed, kind)
        np.testing.assert_array_equal(item.label, label)
        assert item.classes == classes
        assert item.image.mode == "RGB" and item.image.size == (label.shape[1], label.shape[0])
        assert (item.label == 255).sum() > 0


@pytest.mark.parametrize("aug", [False, True])
def test_voc_reader(tmp_path, aug):
    ids = make_voc(tmp_path, SEEDS, aug=aug)
    # any of VOCdevkit's parent, VOCdevkit or VOC2012 works as the root
    for root in (tmp_path, tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2012"):
        ds = open_dataset("voc", root, "val")
        _check(ds, ids, "voc")
    assert ds.num_labels == 21 and ds.class_index("dog") == 12


def test_voc_prefers_the_augmented_labels(tmp_path):
    make_voc(tmp_path, SEEDS, aug=False)
    make_voc(tmp_path, SEEDS, aug=True)
    ds = open_dataset("voc", tmp_path, "val")
    assert ds.label_path(ds.ids[0]).parent.name == "SegmentationClassAug"


def test_context_reader(tmp_path):
    ids = make_context(tmp_path, SEEDS)
    ds = open_dataset("context", tmp_path, "val")
    _check(ds, ids, "context")
    assert ds.num_labels == 60


def test_coco_object_readers_in_both_conventions(tmp_path):
    ids = make_coco2014(tmp_path / "coco2014", SEEDS)
    ds = open_dataset("coco-object", tmp_path / "coco2014", "val")
    _check(ds, dict(sorted(ids.items())), "coco")  # no list file: sorted label names
    ids = make_coco164k(tmp_path / "stuff", SEEDS)
    ds = open_dataset("coco-object-164k", tmp_path / "stuff", "val")
    _check(ds, dict(sorted(ids.items())), "coco")
    assert ds.num_labels == 81
    with pytest.raises(DatasetError, match="coco-object-164k"):
        open_dataset("coco-object", tmp_path / "stuff", "val")


def test_shapes_dataset_matches_the_generator():
    ds = ShapesDataset(split="val", count=5)
    assert ds.ids == [str(s) for s in SPLITS["val"][:5]]
    item = ds[2]
    s = sample(SPLITS["val"][2])
    np.testing.assert_array_equal(item.label, s.mask)
    assert item.classes == tuple(c for c in CLASSES if c in s.classes)
    assert len(ShapesDataset(split="test")) == 10_000


def test_missing_and_malformed_folders_say_what_was_expected(tmp_path):
    with pytest.raises(DatasetError, match="--root"):
        open_dataset("voc", None)
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset("voc", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="JPEGImages"):
        open_dataset("voc", tmp_path)
    with pytest.raises(DatasetError, match="did you mean 'voc'"):
        open_dataset("vocc", tmp_path)
    make_voc(tmp_path, SEEDS)
    with pytest.raises(DatasetError, match="train.txt"):
        open_dataset("voc", tmp_path, "train")
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/empty.txt").write_text("\n")
    with pytest.raises(DatasetError, match="empty"):
        open_dataset("voc", tmp_path, "empty")
    with pytest.raises(DatasetError, match="SegmentationClassContext"):
        open_dataset("context", tmp_path / "VOCdevkit" / "VOC2012")
    with pytest.raises(DatasetError, match="no label PNGs"):
        (tmp_path / "c" / "val2014").mkdir(parents=True)
        (tmp_path / "c" / "SegmentationClass" / "val2014").mkdir(parents=True)
        open_dataset("coco-object", tmp_path / "c")
    with pytest.raises(DatasetError, match="split must be one of"):
        ShapesDataset(split="dev")


def test_bad_label_files_are_named(tmp_path):
    ids = make_voc(tmp_path, SEEDS)
    ds = open_dataset("voc", tmp_path, "val")
    first, second, third = list(ids)
    Image.new("RGB", (64, 64), (128, 0, 0)).save(ds.label_path(first))
    with pytest.raises(DatasetError, match="colour image.*index PNG"):
        ds.load(first)
    Image.fromarray(np.full((64, 64), 40, np.uint8), mode="L").save(ds.label_path(second))
    with pytest.raises(DatasetError, match=r"values \[40\] outside 0..20"):
        ds.load(second)
    ds.label_path(third).write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=f"{third}.png is not a readable PNG"):
        ds.load(third)
    ds.image_path(third).unlink()
    with pytest.raises(DatasetError, match="does not exist"):
        ds.image(third)
    with pytest.raises(DatasetError, match="did you mean 'dog'"):
        ds.class_index("dgo")


def test_image_and_label_of_different_sizes_is_an_error(tmp_path):
    ids = make_voc(tmp_path, SEEDS[:1])
    ds = open_dataset("voc", tmp_path, "val")
    i = next(iter(ids))
    Image.new("RGB", (50, 40)).save(ds.image_path(i))
    with pytest.raises(DatasetError, match="50x40 but its label is 64x64"):
        ds.load(i)
