"""Perturbation helpers shared by methods and metrics: baselines, blur, spatial axes.

Methods (engine/methods) and metrics (engine/metrics) both import this module, so a metric never
imports a method's internals. Everything here is numpy/scipy and works on batches.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from engine.protocol import ClassifierLike

Baseline = str | float | np.ndarray


def spatial_axes(model: ClassifierLike, batched: bool = True) -> tuple[int, int]:
    """The (H, W) axes of a batch (or of one example if ``batched`` is False)."""
    if model.layout == "NCHW":
        axes = (2, 3)
    elif model.layout == "NHWC":
        axes = (1, 2)
    else:
        raise ValueError(
            f"this method needs an image model (layout NCHW or NHWC); model.layout={model.layout!r}"
        )
    return axes if batched else (axes[0] - 1, axes[1] - 1)


def gaussian_blur(x: np.ndarray, sigma: float, axes: tuple[int, int]) -> np.ndarray:
    """Blur the two spatial ``axes`` of a batch like PAIR's ``blur_ig.gaussian_blur``.

    ``scipy.ndimage.gaussian_filter`` with ``mode="constant"`` (zero padding, truncate 4.0),
    sigma 0 on every other axis (scipy skips those axes, so a batch blurs exactly like each of its
    images); ``sigma == 0`` returns ``x`` itself. The output has the dtype of ``x``.
    """
    if sigma == 0:
        return x
    sigmas = [0.0] * x.ndim
    for a in axes:
        sigmas[a] = float(sigma)
    return ndimage.gaussian_filter(x, sigma=sigmas, mode="constant")


def make_baseline(
    model: ClassifierLike,
    x: np.ndarray,
    baseline: Baseline,
    *,
    seed: int | None = 0,
    blur_sigma: float = 10.0,
) -> np.ndarray:
    """Baseline batch shaped like ``x`` (float32).

    "black": ``input_range`` low; "white": high; "blur": ``x`` blurred with ``blur_sigma`` over the
    spatial axes (zero padding, like Blur IG); "uniform": i.i.d. uniform within ``input_range``
    from ``np.random.default_rng(seed)``; a number: that constant; an array shaped like one example
    or like ``x``.
    """
    lo, hi = (float(v) for v in model.input_range)
    if isinstance(baseline, str):
        if baseline == "black":
            return np.full_like(x, lo)
        if baseline == "white":
            return np.full_like(x, hi)
        if baseline == "blur":
            return gaussian_blur(x, blur_sigma, spatial_axes(model))
        if baseline == "uniform":
            rng = np.random.default_rng(seed)
            return rng.uniform(lo, hi, size=x.shape).astype(np.float32)
        raise ValueError(
            f"baseline must be 'black', 'white', 'blur', 'uniform', a number or an array; got {baseline!r}"
        )
    b = np.asarray(baseline, dtype=np.float32)
    if b.ndim == 0 or b.shape == x.shape[1:]:
        b = np.broadcast_to(b, x.shape).copy()
    if b.shape != x.shape:
        raise ValueError(f"baseline shape {b.shape} matches neither x {x.shape} nor one example")
    if not np.isfinite(b).all():
        raise ValueError("baseline contains NaN/Inf values")
    return b
