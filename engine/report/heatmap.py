"""Attribution maps as pictures: one 2-D heatmap per image, coloured and overlaid on the photo.

The 2-D reduction and scaling follow each method's own post-processing (docs/metrics.md §
post-processing): PAIR's grayscale visualisation (Σ|channels|, 99th percentile) by default, AGI's
80th/99th percentile clip of the channel mean for AGI, the inverted mask for I-GOS-family masks.
``shared_scale`` puts several maps (every image of one method, or both models of a compare) on
one colour scale, so their brightness can be compared.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from engine.postprocess import agi_clip, igos_invert, min_max, pair_grayscale, reduce_channels

SCALES = ("own", "shared")


def to_hwc(x: np.ndarray, layout: str) -> np.ndarray:
    """One example (C, H, W) or (H, W, C) as (H, W, C)."""
    return np.moveaxis(x, 0, -1) if layout == "NCHW" else x


def heatmap_2d(attribution: np.ndarray, layout: str, method: str = "") -> np.ndarray:
    """One example's map as (H, W) in [0, 1] with the method's own post-processing."""
    a = to_hwc(np.asarray(attribution, np.float64), layout) if attribution.ndim == 3 else attribution
    if a.ndim == 2:  # already spatial (masks, Grad-CAM upsampled, RISE)
        if method in ("igos", "igos_pp", "mask"):  # a deletion mask: small = important
            return igos_invert(a)
        return min_max(a)
    if method == "agi":
        return agi_clip(a)
    return pair_grayscale(a)


def shared_scale(attributions, layout: str, percentile: float = 99) -> list[np.ndarray]:
    """Σ|channels| of each map, all divided by one number — the ``percentile``-th percentile of
    every pixel of every map pooled — and clipped to [0, 1] (PAIR's grayscale visualisation with
    one vmax for the group, and vmin 0 so that zero attribution is dark everywhere)."""
    planes = [
        reduce_channels(to_hwc(np.asarray(a, np.float64), layout) if np.ndim(a) == 3 else a, "abs_sum")
        for a in attributions
    ]
    vmax = float(np.percentile(np.concatenate([p.ravel() for p in planes]), percentile)) if planes else 0.0
    if vmax <= 0:
        return [np.zeros_like(p) for p in planes]
    return [np.clip(p / vmax, 0, 1) for p in planes]


def colourise(h: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 through a matplotlib colour map."""
    from matplotlib import colormaps  # imported here: reports only

    return (colormaps[cmap](np.clip(h, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, h: np.ndarray, alpha: float = 0.55, cmap: str = "inferno") -> np.ndarray:
    """The photo (H, W, C) in [0, 1] under the coloured heatmap; uint8 RGB."""
    img = np.clip(image, 0, 1)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    heat = colourise(h, cmap).astype(np.float64) / 255
    weight = alpha * h[..., None] ** 0.5  # faint where unimportant, so the photo shows through
    return (np.clip((1 - weight) * img + weight * heat, 0, 1) * 255).round().astype(np.uint8)


def png_bytes(rgb: np.ndarray, scale: int = 1) -> bytes:
    img = Image.fromarray(rgb)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def render(
    x: np.ndarray,
    attribution: np.ndarray,
    layout: str,
    input_range: tuple[float, float],
    method: str = "",
    *,
    h: np.ndarray | None = None,
    size: int = 224,
) -> bytes:
    """PNG of one example's heatmap over its photo, upscaled to about ``size`` pixels."""
    lo, hi = input_range
    image = (to_hwc(np.asarray(x, np.float64), layout) - lo) / (hi - lo)
    if h is None:
        h = heatmap_2d(attribution, layout, method)
    if h.shape != image.shape[:2]:  # a coarse map (mask, Grad-CAM): nearest-neighbour to the photo
        rows = np.minimum((np.arange(image.shape[0]) * h.shape[0]) // image.shape[0], h.shape[0] - 1)
        cols = np.minimum((np.arange(image.shape[1]) * h.shape[1]) // image.shape[1], h.shape[1] - 1)
        h = h[rows][:, cols]
    scale = max(1, size // max(image.shape[:2]))
    return png_bytes(overlay(image, h), scale)


__all__ = ["heatmap_2d", "colourise", "overlay", "png_bytes", "render", "shared_scale", "to_hwc"]
