"""Segmentation datasets in their standard folder layouts, with the class-name tables of each.

Every reader gives the same thing: ``ids`` (strings, in a fixed order), ``class_names`` (label k is
``class_names[k-1]``, 0 is background, 255 is ignored), and items with the image, the label array
and the names of the classes present. Nothing is downloaded; a folder that is not where it should be
gets a ``DatasetError`` that says what was expected where.

Layouts (method.md §8):

- ``voc``: the ``VOC2012`` folder of VOCdevkit: ``JPEGImages/<id>.jpg``, labels in
  ``SegmentationClassAug/<id>.png`` (preferred when present) or ``SegmentationClass/<id>.png``,
  lists in ``ImageSets/Segmentation/<split>.txt`` (``train_aug`` also from ``ImageSets/SegmentationAug``).
- ``context``: the ``VOC2010`` folder with PASCAL Context's 59-class labels as made by the usual
  conversion (``SegmentationClassContext/<id>.png``: 0 background, 1..59 classes) and lists
  ``ImageSets/SegmentationContext/<split>.txt``.
- ``coco-object``: the paper's convention, COCO 2014 images with per-image class PNGs:
  ``<split>2014/<id>.jpg`` (or ``JPEGImages/<split>2014``, ``images/<split>2014``) and
  ``SegmentationClass/<split>2014/<id>.png`` (0 background, 1..80 in COCO order, 255 ignored),
  optional list ``ImageSets/<split>.txt``.
- ``coco-object-164k``: the COCO-Stuff-164k-derived convention of CLIP-based peers:
  ``images/<split>2017/<id>.jpg`` and ``annotations/<split>2017/<id>_instanceTrainIds.png``
  (0 background, 1..80 objects, 255 unlabelled).
- ``shapes``: the project's synthetic world (``iseg.shapes``), made on the fly; ids are seeds.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import registry
from .metrics import IGNORE

__all__ = [
    "VOC_CLASSES", "CONTEXT_CLASSES", "COCO_CLASSES", "DatasetError", "Item", "SegmentationDataset",
    "VOCDataset", "ContextDataset", "COCOObjectDataset", "COCOObject164kDataset",
    "DATASETS", "dataset_names", "dataset_class", "open_dataset", "read_label",
]

# Names as they go into prompts: words a text encoder knows ("potted plant", not "pottedplant").
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
    "tv monitor",
)

CONTEXT_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground",
    "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "potted plant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tv monitor", "wall", "water", "window", "wood",
)

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


class DatasetError(ValueError):
    """A dataset folder, list or label file is missing or not in the expected form."""


@dataclass(frozen=True)
class Item:
    """One image of a dataset: ``label`` is ``(H, W)`` uint8 (0 background, 255 ignored)."""

    id: str
    image: Image.Image
    label: np.ndarray
    classes: tuple[str, ...]  # names of the classes present in ``label``, in label order


def read_label(path: Path, num_labels: int, what: str = "label") -> np.ndarray:
    """An index PNG (mode P, L or I) as a uint8 array, checked against ``num_labels`` and 255."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            arr = np.array(img)
    except FileNotFoundError:
        raise DatasetError(f"{what} file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"{what} file {path} is not a readable PNG ({err}); re-extract or re-convert it") from None
    if arr.ndim != 2:
        raise DatasetError(f"{what} file {path} is a {mode} colour image; expected an index PNG (mode P or L) whose "
                           "pixel values are class ids - convert colour-coded masks to ids first")
    if mode == "1":  # a 1-bit mask reads as True/False: its "1" is not a class id
        raise DatasetError(f"{what} file {path} is a 1-bit (black and white) mask; expected an index PNG (mode P or "
                           "L) whose pixel values are class ids (0 background, 1.. classes, 255 ignored)")
    values = np.unique(arr)
    if arr.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        raise DatasetError(f"{what} file {path} holds fractional values such as {values[values != np.round(values)][0]}; "
                           "class ids are whole numbers")
    bad = values[((values >= num_labels) & (values != IGNORE)) | (values < 0)]
    if bad.size:
        raise DatasetError(f"{what} file {path} holds values {bad[:8].tolist()} outside 0..{num_labels - 1} and "
                           f"{IGNORE}; is it from another dataset or convention?")
    return arr.astype(np.uint8)


def _read_image(path: Path) -> Image.Image:
    """The image on its stored pixel grid, as its label is: an EXIF orientation tag is dropped, not
    applied (turning the image would put predictions on another grid than the label's)."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB") if img.mode != "RGB" else img.copy()
            rgb.info.pop("exif", None)
            if rgb.getexif().get(0x0112, 1) not in (0, 1):
                exif = rgb.getexif()
                del exif[0x0112]
            return rgb
    except FileNotFoundError:
        raise DatasetError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"image {path} is not a readable image ({err})") from None


def _need_dir(path: Path, dataset: str, hint: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{dataset}: expected the folder {path} ({hint})")
    return path


def _read_list(path: Path, dataset: str) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{dataset}: expected the image list {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of a name
    except UnicodeDecodeError as err:
        raise DatasetError(f"{dataset}: the image list {path} is not UTF-8 text (bad byte at offset {err.start})") from None
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    # SegmentationAug lists hold "/JPEGImages/x.jpg /SegmentationClassAug/x.png" pairs
    ids = [Path(i).stem for i in ids]
    if not ids:
        raise DatasetError(f"{dataset}: the image list {path} is empty")
    if len(set(ids)) != len(ids):  # an image listed twice would count twice in some sums and once in others
        seen: set[str] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))
        raise DatasetError(f"{dataset}: the image list {path} names {twice!r} more than once; list each image once")
    return ids


def _pascal_root(root, year_folder: str) -> Path:
    """``root`` itself, or its ``VOCxxxx`` / ``VOCdevkit/VOCxxxx`` folder, whichever holds JPEGImages."""
    root = Path(root).expanduser()
    for candidate in (root, root / year_folder, root / "VOCdevkit" / year_folder):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    return root


class _FlatPascal:
    """Path helpers of the VOC-style layouts: ``JPEGImages/<id>.jpg`` and ``<labels>/<id>.png``."""

    _images: Path
    _labels: Path

    def image_path(self, id: str) -> Path:
        return self._images / f"{id}.jpg"

    def label_path(self, id: str) -> Path:
        return self._labels / f"{id}.png"


class SegmentationDataset:
    """Base class: subclasses set ``name``, ``class_names``, ``ids`` and the two path functions."""

    name = "dataset"
    class_names: tuple[str, ...] = ()
    ids: list[str]
    split: str
    root: Path | None

    @property
    def num_labels(self) -> int:
        """Labels including background: ``len(class_names) + 1``."""
        return len(self.class_names) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Item:
        return self.load(self.ids[index])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def image_path(self, id: str) -> Path:
        raise NotImplementedError

    def label_path(self, id: str) -> Path:
        raise NotImplementedError

    def image(self, id: str) -> Image.Image:
        return _read_image(self.image_path(id))

    def label(self, id: str) -> np.ndarray:
        return read_label(self.label_path(id), self.num_labels, f"{self.name} label")

    def classes_in(self, label: np.ndarray) -> tuple[str, ...]:
        """Names of the classes present in a label array, in label order (ignoring 0 and 255)."""
        present = [int(v) for v in np.unique(label) if 0 < v < self.num_labels]
        return tuple(self.class_names[v - 1] for v in present)

    def load(self, id: str) -> Item:
        image, label = self.image(id), self.label(id)
        if (label.shape[0], label.shape[1]) != (image.height, image.width):
            raise DatasetError(f"{self.name}: image {id} is {image.width}x{image.height} but its label is "
                               f"{label.shape[1]}x{label.shape[0]}")
        return Item(id=id, image=image, label=label, classes=self.classes_in(label))

    @classmethod
    def to_dataset_labels(cls, labels: np.ndarray, classes: Sequence[str], dtype=np.uint8) -> np.ndarray:
        """Labels of a segmentation result (k = ``classes[k-1]``) as this dataset's labels."""
        lut = np.array([0] + [cls.class_index(c) for c in classes], dtype)
        return lut[labels]

    @classmethod
    def class_index(cls, name: str) -> int:
        """Label value of a class name (1-based), with a hint for near misses."""
        try:
            return cls.class_names.index(name) + 1
        except ValueError:
            close = difflib.get_close_matches(name, cls.class_names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DatasetError(f"{name!r} is not a {cls.name} class{hint}; classes: {', '.join(cls.class_names)}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, images={len(self)}, classes={len(self.class_names)})"


class VOCDataset(_FlatPascal, SegmentationDataset):
    """PASCAL VOC 2012 (20 classes + background)."""

    name = "voc"
    class_names = VOC_CLASSES

    def __init__(self, root, split: str = "train", annotations: str = "auto"):
        root = _pascal_root(root, "VOC2012")
        self.root, self.split = root, split
        self._images = _need_dir(root / "JPEGImages", "voc", "give --root the VOC2012 folder of VOCdevkit")
        if annotations == "auto":
            annotations = "SegmentationClassAug" if (root / "SegmentationClassAug").is_dir() else "SegmentationClass"
        self._labels = _need_dir(root / annotations, "voc", "labels; SegmentationClassAug or SegmentationClass")
        lists = [root / "ImageSets" / "Segmentation" / f"{split}.txt", root / "ImageSets" / "SegmentationAug" / f"{split}.txt"]
        found = next((p for p in lists if p.is_file()), None)
        if found is None:
            raise DatasetError(f"voc: no list for split {split!r}; expected {lists[0]} (splits: train, val, "
                               "trainval; train_aug with SegmentationAug)")
        self.ids = _read_list(found, "voc")


class ContextDataset(_FlatPascal, SegmentationDataset):
    """PASCAL Context (59 classes + background) on VOC2010 images."""

    name = "context"
    class_names = CONTEXT_CLASSES

    def __init__(self, root, split: str = "val"):
        root = _pascal_root(root, "VOC2010")
        self.root, self.split = root, split
        self._images = _need_dir(root / "JPEGImages", "context", "give --root the VOC2010 folder of VOCdevkit")
        self._labels = _need_dir(root / "SegmentationClassContext", "context",
                                 "59-class labels, 0 = background, from the standard PASCAL Context conversion")
        self.ids = _read_list(root / "ImageSets" / "SegmentationContext" / f"{split}.txt", "context")


class COCOObjectDataset(_FlatPascal, SegmentationDataset):
    """COCO-Object as the paper uses it: COCO 2014 images, per-image class PNGs (80 classes + background)."""

    name = "coco-object"
    class_names = COCO_CLASSES

    def __init__(self, root, split: str = "val"):
        root = Path(root).expanduser()
        self.root, self.split = root, split
        folder = f"{split}2014"
        if (root / "annotations" / f"{split}2017").is_dir() and not (root / "SegmentationClass").is_dir():
            raise DatasetError(f"coco-object: {root} looks like the COCO-Stuff-164k layout; use --dataset coco-object-164k")
        options = [root / folder, root / "JPEGImages" / folder, root / "images" / folder]
        self._images = next((p for p in options if p.is_dir()), None)
        if self._images is None:
            raise DatasetError(f"coco-object: expected the images in one of {[str(p) for p in options]}")
        self._labels = _need_dir(root / "SegmentationClass" / folder, "coco-object",
                                 "per-image class PNGs: 0 background, 1..80 in COCO order, 255 ignored")
        listed = root / "ImageSets" / f"{split}.txt"
        if listed.is_file():
            self.ids = _read_list(listed, "coco-object")
        else:
            self.ids = sorted(p.stem for p in self._labels.glob("*.png"))
            if not self.ids:
                raise DatasetError(f"coco-object: no label PNGs in {self._labels}")


class COCOObject164kDataset(SegmentationDataset):
    """COCO-Object from COCO-Stuff-164k (``*_instanceTrainIds.png``), as CLIP-based peers evaluate it."""

    name = "coco-object-164k"
    class_names = COCO_CLASSES
    suffix = "_instanceTrainIds.png"

    def __init__(self, root, split: str = "val"):
        root = Path(root).expanduser()
        self.root, self.split = root, split
        folder = f"{split}2017"
        self._images = _need_dir(root / "images" / folder, "coco-object-164k", "COCO 2017 images")
        self._labels = _need_dir(root / "annotations" / folder, "coco-object-164k",
                                 f"<id>{self.suffix} from the COCO-Object conversion of COCO-Stuff-164k")
        self.ids = sorted(p.name[: -len(self.suffix)] for p in self._labels.glob(f"*{self.suffix}"))
        if not self.ids:
            raise DatasetError(f"coco-object-164k: no *{self.suffix} files in {self._labels}; "
                               "convert COCO-Stuff-164k to COCO-Object labels first")

    def image_path(self, id: str) -> Path:
        return self._images / f"{id}.jpg"

    def label_path(self, id: str) -> Path:
        return self._labels / f"{id}{self.suffix}"


DATASETS = {
    "voc": VOCDataset,
    "context": ContextDataset,
    "coco-object": COCOObjectDataset,
    "coco-object-164k": COCOObject164kDataset,
}


def _plugin_datasets() -> dict:
    # datasets that registered models bring (the shapes world), from their plug-ins
    found = {}
    for model in registry.MODELS:
        found.update(getattr(registry.plugin(model), "DATASETS", {}))
    return found


def dataset_names() -> list[str]:
    """Every dataset name ``open_dataset`` accepts."""
    return sorted(set(DATASETS) | set(_plugin_datasets()))


def dataset_class(name: str) -> type[SegmentationDataset]:
    """The reader class of a dataset name; ``DatasetError`` with the closest name when unknown."""
    found = DATASETS.get(name) or _plugin_datasets().get(name)
    if found is None:
        close = difflib.get_close_matches(str(name), dataset_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DatasetError(f"unknown dataset {name!r}{hint}; datasets: {', '.join(dataset_names())}")
    return found


def open_dataset(name: str, root=None, split: str | None = None, **options) -> SegmentationDataset:
    """A dataset reader by name (``voc``, ``context``, ``coco-object``, ``coco-object-164k``, and
    datasets of registered models such as ``shapes``, which are generated and need no folder)."""
    cls = dataset_class(name)
    if split is not None and (not isinstance(split, str) or not split.strip() or any(c in split for c in "/\\")
                              or split.startswith(".")):
        raise DatasetError(f"{name}: split {split!r} is not a split name (such as train or val)")
    if getattr(cls, "needs_root", True):
        if root is None:
            raise DatasetError(f"{name}: give the dataset folder with --root (nothing is downloaded)")
        if not Path(root).expanduser().is_dir():
            raise DatasetError(f"{name}: the folder {root} does not exist")
    kwargs = dict(options)
    if split is not None:
        kwargs["split"] = split
    return cls(root, **kwargs)


def class_names_of(name: str) -> Sequence[str]:
    """The class-name table of a dataset (without background)."""
    return dataset_class(name).class_names
