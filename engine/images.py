"""Image files -> model input: decode, resize (shorter side) and centre-crop, [0, 1], layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def load_images(
    paths, input_shape: tuple[int, ...], layout: str | None, input_range: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """A float32 batch shaped (N, *input_shape) from image files, scaled to ``input_range``."""
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"the model's layout is {layout!r}; image files need an NCHW or NHWC image model")
    c, h, w = input_shape if layout == "NCHW" else (input_shape[2], input_shape[0], input_shape[1])
    batch = []
    for p in paths:
        try:
            img = Image.open(Path(p))
            img = img.convert("RGB" if c == 3 else "L")
        except Exception as e:
            raise ValueError(f"{p}: cannot read image ({e})") from e
        arr = np.asarray(resize_center_crop(img, h, w), np.float32) / 255.0
        arr = arr.reshape(h, w, c)
        batch.append(arr.transpose(2, 0, 1) if layout == "NCHW" else arr)
    lo, hi = input_range
    return (np.stack(batch) * (hi - lo) + lo).astype(np.float32)


def resize_center_crop(img: Image.Image, h: int, w: int) -> Image.Image:
    scale = max(h / img.height, w / img.width)
    size = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    img = img.resize(size, Image.BILINEAR)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((left, top, left + w, top + h))
