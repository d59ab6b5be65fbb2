"""Sample photographs bundled with scikit-image, ready for an image classifier.

No download: the photos ship inside the scikit-image wheel (``skimage.data``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image

# RGB photos in scikit-image's wheel with an obvious ImageNet subject (chelsea: a tabby cat,
# coffee: an espresso cup, rocket: a space shuttle launch, astronaut: a portrait).
DEFAULT_NAMES = ("chelsea", "coffee", "astronaut", "rocket")


def load_photo(name: str) -> np.ndarray:
    """The scikit-image photo ``name`` as uint8 (H, W, 3)."""
    from skimage import data

    loader = getattr(data, name, None)
    if loader is None:
        raise ValueError(f"skimage.data has no image {name!r}")
    image = np.asarray(loader())
    if image.ndim == 2:  # grayscale photos (camera, coins): replicate to RGB
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"skimage.data.{name} is not an RGB or grayscale photo: {image.shape}")
    return image.astype(np.uint8)


def center_square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Crop the central square of a uint8 (H, W, 3) image and resize it to (size, size, 3) with
    PIL bilinear interpolation; returns float32 in [0, 1]."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top : top + side, left : left + side])
    resized = square.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


def sample_images(
    size: int = 224,
    names: Sequence[str] = DEFAULT_NAMES,
    layout: Literal["NCHW", "NHWC"] = "NCHW",
) -> tuple[np.ndarray, list[str]]:
    """A batch of sample photos: float32 in [0, 1], shape (N, 3, size, size) for ``NCHW`` or
    (N, size, size, 3) for ``NHWC``, and their names in the same order."""
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be NCHW or NHWC, got {layout!r}")
    batch = np.stack([center_square_resize(load_photo(n), size) for n in names])
    if layout == "NCHW":
        batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
    return batch, list(names)
