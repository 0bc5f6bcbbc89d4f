"""Images in, images out: reading every input users hand us, and mapping results back.

iSeg runs on a square image of the model's native size. ``prepare`` turns any supported input
into that square (stretched as the reference does, or padded) and records a ``Geometry`` so that
``to_original`` can put maps back on the original pixel grid exactly.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["MIN_SIDE", "MAX_SIDE", "Geometry", "load_image", "read_pixels", "to_uint8", "prepare", "to_original",
           "as_image_list", "image_name"]

MIN_SIDE = 8  # one latent cell of an 8x-downsampling VAE
ASPECT_MODES = ("stretch", "pad")
# Images whose longer side is larger are reduced by an integer factor as they are read (JPEG
# decodes at 1/2, 1/4 or 1/8 scale directly): the model sees 512 pixels at most, and results at
# full size of a 100-megapixel scan would take gigabytes. Results then come at the reduced size.
MAX_SIDE = 4096


@dataclass(frozen=True)
class Geometry:
    """Where an image sits inside the square the model saw."""

    height: int
    width: int
    aspect: str  # "stretch" or "pad"

    @property
    def side(self) -> int:
        """Side of the padded square (``pad``), or of the image's longer edge (``stretch``)."""
        return max(self.height, self.width)


def _reduce_factor(width: int, height: int) -> int:
    # never below MIN_SIDE on the short side: a 9000x12 strip is small enough as it is
    return max(1, min(math.ceil(max(width, height) / MAX_SIDE), min(width, height) // MIN_SIDE))


def _reduced(img: Image.Image, name: str, size: tuple[int, int] | None = None) -> Image.Image:
    """``img`` turned upright and reduced until its longer side is at most ``MAX_SIDE``.

    ``size`` is the size the file declares (before a JPEG draft), for the warning.
    """
    if getattr(img, "n_frames", 1) > 1:  # an animated GIF, WebP or PNG, a multi-page TIFF
        warnings.warn(f"{name} has {img.n_frames} frames; iSeg segments the first one only (split the file to "
                      "segment the others)", stacklevel=4)
    img = _upright(img)
    factor = _reduce_factor(*img.size)
    before = img.size
    if factor > 1:
        if img.mode in ("1", "P", "I;16", "I;16B", "I;16L", "PA"):
            # reduce() works on whole-byte or 32-bit modes; grey stays one byte a pixel
            img = img.convert({"1": "L", "P": "RGBA", "PA": "RGBA"}.get(img.mode, "I"))
        img = img.reduce(factor)
    w, h = size or before
    if max(img.size) < max(w, h):  # reduced here or by a JPEG draft (turning upright keeps the longer side)
        warnings.warn(f"{name} is {w}x{h} pixels; read at {img.size[0]}x{img.size[1]} (iseg.images.MAX_SIDE = "
                      f"{MAX_SIDE}); results come at that size", stacklevel=4)
    return img


def _open_file(path: Path, label: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            declared = img.size
            factor = _reduce_factor(*declared)
            if factor > 1 and img.format == "JPEG":
                # decode at 1/2, 1/4 or 1/8 scale straight from the DCT: no full-size copy at all
                img.draft(img.mode, (max(1, declared[0] // factor), max(1, declared[1] // factor)))
            img.load()
            return _from_pil(_reduced(img, label, declared), label)
    except Image.DecompressionBombError as err:
        raise ValueError(
            f"{path} is too large to open safely ({err}). If you trust the file, raise Pillow's limit first "
            "(PIL.Image.MAX_IMAGE_PIXELS = None), or downscale the file"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read {path} as an image ({err}); is the file corrupt or not an image?") from err


def _upright(img: Image.Image) -> Image.Image:
    # exif_transpose copies even an upright image; a large one is not copied for nothing
    if img.getexif().get(0x0112, 1) in (0, 1):
        return img
    return ImageOps.exif_transpose(img)


def _from_pil(img: Image.Image, name: str) -> np.ndarray:
    img = _upright(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return np.repeat((arr / top)[..., None], 3, axis=-1).clip(0, 1).astype(np.float32)
    if img.mode == "F":
        return _from_array(np.asarray(img, dtype=np.float32), name)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # transparent pixels become white, as most viewers show them
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _from_array(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected an HxW or HxWxC array, got shape {arr.shape}")
    channels = arr.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(
            f"{name}: an image needs 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {channels} "
            f"(shape {arr.shape}); pass channels last, e.g. HxWx3"
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    elif arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}: the float array contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{name}: float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                "divide by 255 or pass a uint8 array"
            )
    else:
        raise TypeError(f"{name}: unsupported array dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    if channels == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif channels == 4:
        alpha = arr[..., 3:]
        arr = arr[..., :3] * alpha + (1.0 - alpha)  # composite on white
    return arr


def load_image(image, name: str | None = None) -> np.ndarray:
    """Read one image into an ``HxWx3`` float32 array in [0, 1].

    Accepts a PIL image (any mode: L, RGBA, P, 16-bit...), a path, a numpy array (HxW, HxWx1/3/4,
    uint8, uint16 or float in [0, 1]) or a tensor (CxH xW or HxWxC, C in 1/3/4). EXIF orientation
    is honoured. Files and PIL images larger than ``MAX_SIDE`` are reduced as they are read (with
    a warning); a file past Pillow's decompression-bomb limit is refused with its path.
    """
    label = name or "image"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        label = name or str(path)
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {path}")
        if path.is_dir():
            raise ValueError(f"{path} is a folder, not an image file")
        arr = _open_file(path, label)
    elif isinstance(image, Image.Image):
        arr = _from_pil(_reduced(image, label), label)
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
            t = t.float()
        arr = _from_array(t.numpy(), label)
    elif isinstance(image, np.ndarray):
        arr = _from_array(image, label)
    else:
        raise TypeError(
            f"{label}: unsupported image type {type(image).__name__}; "
            "pass a PIL image, a file path, a numpy array or a torch tensor"
        )
    return _checked_size(arr, label)


def _checked_size(arr: np.ndarray, label: str) -> np.ndarray:
    h, w = arr.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"{label} is {w}x{h} pixels; iSeg needs at least {MIN_SIDE}x{MIN_SIDE}")
    return arr


def read_pixels(image, name: str | None = None) -> np.ndarray:
    """``load_image``, except that 8-bit RGB or grey sources (PIL images, uint8 arrays) stay
    ``HxWx3`` uint8: ``prepare`` converts them on the model's device, which saves a float copy of
    every image on the host. Everything else comes back as ``load_image`` gives it."""
    if isinstance(image, Image.Image) and image.mode in ("RGB", "L"):
        arr = np.asarray(_reduced(image, name or "image").convert("RGB"))
    elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        arr = image
    else:
        return load_image(image, name)
    return _checked_size(arr, name or "image")


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """An 8-bit copy of an image array: uint8 as it is, floats in [0, 1] scaled and rounded."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr.copy()
    return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)


def prepare(arr: np.ndarray, size: int, aspect: str = "stretch", pad_value: float = 0.5,
            device: torch.device | str | None = None) -> tuple[torch.Tensor, Geometry]:
    """Make the ``(3, size, size)`` float tensor the model sees, and its ``Geometry``.

    ``stretch`` resizes ignoring aspect ratio (the reference); ``pad`` pads the short side at the
    bottom/right with ``pad_value`` to a square first, so that no object is distorted. With a
    ``device`` the image is moved there first and resized there (a GPU resizes far faster).
    """
    if aspect not in ASPECT_MODES:
        raise ValueError(f"aspect must be one of {ASPECT_MODES}, got {aspect!r}")
    h, w = arr.shape[:2]
    factor = _reduce_factor(w, h)
    if factor > 1 and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == 3:
        # an 8-bit array larger than MAX_SIDE is box-reduced as bytes before any float copy; the
        # geometry keeps its full size, so results still come at the array's own size
        arr = np.asarray(Image.fromarray(arr).reduce(factor))
    arr = np.ascontiguousarray(arr) if arr.flags.writeable else np.array(arr)  # torch refuses read-only views
    t = torch.from_numpy(arr).to(device).permute(2, 0, 1).float()
    if arr.dtype == np.uint8:
        t = t / 255.0
    if aspect == "pad" and h != w:
        side = max(h, w)
        canvas = torch.full((3, side, side), float(pad_value), device=t.device)
        canvas[:, :h, :w] = t
        t = canvas
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return t.clamp(0, 1), Geometry(h, w, aspect)


def to_original(maps: torch.Tensor, geometry: Geometry, size: int) -> torch.Tensor:
    """Resample ``(..., h, w)`` maps of the model's square to the original image's pixels.

    Maps are first upsampled to the processing size ``size`` (as the reference does with 512),
    then to the original size; with ``pad`` the square is scaled to the padded side and cropped.
    """
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if geometry.aspect == "pad":
        side = geometry.side
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        x = x[..., : geometry.height, : geometry.width]
    elif x.shape[-2:] != (geometry.height, geometry.width):
        x = F.interpolate(x, size=(geometry.height, geometry.width), mode="bilinear", align_corners=False)
    return x.reshape(*lead, geometry.height, geometry.width)


def as_image_list(images) -> tuple[list, bool]:
    """``(items, many)``: a list, a tuple, a ``(B, H, W, 3)`` array or a ``(B, 3, H, W)`` tensor gives
    its images and ``many=True``, for every ``B`` (a loader's last batch of one still gives a list);
    anything else is one image (``many=False``)."""
    if isinstance(images, (list, tuple)):
        return list(images), True
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images), True
    return [images], False


def image_name(item, index: int) -> str:
    """How error messages name an input: its path, else its position."""
    if isinstance(item, (str, Path)):
        return str(item)
    return f"image {index}"
