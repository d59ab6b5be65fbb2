"""Perturbation helpers shared by methods and metrics: baselines, blur, spatial axes.

Methods (engine/methods) and metrics (engine/metrics) both import this module, so a metric never
imports a method's internals. Everything here is numpy/scipy and works on batches.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from engine.errors import ParameterError
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


def channel_first(draw, shape: tuple[int, ...], layout: str | None) -> np.ndarray:
    """``draw(shape)`` made in channel-first order and returned in ``layout``.

    Random tensors of an NHWC model are drawn as (…, C, H, W) and moved to (…, H, W, C), so a seed
    puts the same numbers on the same pixel and channel whatever the layout: a PyTorch model and
    its Keras port get the same noise (``onnxplain compare`` relies on it).
    """
    if layout != "NHWC" or len(shape) < 3:
        return draw(tuple(shape))
    *lead, h, w, c = shape
    return np.moveaxis(draw((*lead, c, h, w)), -3, -1)


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
    from ``np.random.default_rng(seed)``, drawn channel-first (:func:`channel_first`); a number:
    that constant; an array shaped like one example or like ``x``.
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
            draw = channel_first(lambda shape: rng.uniform(lo, hi, size=shape), x.shape, model.layout)
            return draw.astype(np.float32)
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


def opencv_gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    """The 1-D kernel of ``cv2.getGaussianKernel(ksize, sigma)`` in float64: exp(−t²/2σ²) for
    t = −(ksize−1)/2 … (ksize−1)/2, normalised to sum 1; σ <= 0 means OpenCV's default
    0.3·((ksize−1)/2 − 1) + 0.8."""
    if int(ksize) != ksize or ksize < 1 or ksize % 2 == 0:
        raise ParameterError(f"blur_kernel must be a positive odd integer, got {ksize!r}")
    if sigma <= 0:
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    t = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    k = np.exp(-(t * t) / (2.0 * sigma * sigma))
    return k / k.sum()


def gaussian_blur_reflect(x: np.ndarray, ksize: int, sigma: float, axes: tuple[int, int]) -> np.ndarray:
    """Separable Gaussian blur of the two spatial ``axes`` like ``cv2.GaussianBlur(img, (k, k), σ)``
    on a float image: OpenCV's kernel, BORDER_REFLECT_101 (scipy's "mirror"), computed in float64.
    I-GOS's baseline (51×51, σ=50) and its metrics' blurred substrate. Returns float32."""
    k = opencv_gaussian_kernel(int(ksize), float(sigma))
    out = np.asarray(x, dtype=np.float64)
    for a in axes:
        out = ndimage.correlate1d(out, k, axis=a, mode="mirror")
    return out.astype(np.float32)


# ---------------------------------------------------------------- substrates for the metrics


def rise_blur_kernel() -> np.ndarray:
    """RISE's 11×11 blur kernel (eclique/RISE ``utils.gkern(11, 5)``), float32.

    Built as RISE builds it: ``scipy.ndimage.gaussian_filter`` of an 11×11 delta with σ = 5 and
    scipy's default ``mode="reflect"``, which folds the wide Gaussian back into the window, so the
    kernel is nearly a box filter (centre 0.0088326, corner 0.0077366; specs/metrics.md §2).
    """
    delta = np.zeros((11, 11))
    delta[5, 5] = 1.0
    return ndimage.gaussian_filter(delta, 5).astype(np.float32)


def rise_blur(x: np.ndarray, axes: tuple[int, int], pad: np.ndarray | float = 0.0) -> np.ndarray:
    """RISE's blur substrate: ``conv2d(x, K, padding=5)`` per channel (no channel mixing) with
    :func:`rise_blur_kernel`, computed in float64, returned as float32.

    RISE pads with zeros in the model's normalised space; for an input in pixel space that is the
    normalisation mean, so ``pad`` (a scalar or one value per channel, broadcast against ``x``)
    is the value outside the image: the result is ``blur(x − pad) + pad``.
    """
    shape = [1] * x.ndim
    shape[axes[0]], shape[axes[1]] = 11, 11
    kernel = rise_blur_kernel().astype(np.float64).reshape(shape)
    pad = np.asarray(pad, dtype=np.float64)
    out = ndimage.correlate(np.asarray(x, np.float64) - pad, kernel, mode="constant") + pad
    return out.astype(np.float32)


def median_blur(x: np.ndarray, size: int, axes: tuple[int, int]) -> np.ndarray:
    """Median over a ``size``×``size`` window of the spatial ``axes``, each channel on its own, with
    the edge pixels replicated (``cv2.medianBlur``'s border). OpenCV takes the median of the uint8
    image; here it is taken of the values themselves (no rounding to 1/255). Returns float32."""
    if int(size) != size or size < 1 or size % 2 == 0:
        raise ParameterError(f"median_kernel must be a positive odd integer, got {size!r}")
    window = [1] * x.ndim
    for a in axes:
        window[a] = int(size)
    return ndimage.median_filter(np.asarray(x, dtype=np.float32), size=window, mode="nearest")


MASK_BASELINES = ("blur", "median", "mixed")


def mask_baseline(
    model: ClassifierLike,
    x: np.ndarray,
    baseline: Baseline,
    *,
    blur_kernel: int = 51,
    blur_sigma: float = 50.0,
    median_kernel: int = 11,
    seed: int | None = 0,
) -> np.ndarray:
    """The baseline of the mask-optimisation methods (I-GOS, iGOS++, meaningful perturbation).

    "blur": ``gaussian_blur_reflect`` (OpenCV's kernel and border; I-GOS: 51, σ=50); "median":
    ``median_blur`` (meaningful perturbation: 11); "mixed": the mean of the two (I-GOS's
    ``blur_type='Mixed'``). Anything else goes to ``make_baseline`` ("black", "white", "uniform",
    a number, an array).
    """
    if isinstance(baseline, str) and baseline in MASK_BASELINES:
        axes = spatial_axes(model)
        if baseline == "median":
            return median_blur(x, median_kernel, axes)
        gauss = gaussian_blur_reflect(x, blur_kernel, blur_sigma, axes)
        if baseline == "blur":
            return gauss
        return ((gauss.astype(np.float64) + median_blur(x, median_kernel, axes)) / 2).astype(np.float32)
    return make_baseline(model, x, baseline, seed=seed)


def bilinear_matrix(size_in: int, size_out: int, align_corners: bool = True) -> np.ndarray:
    """(size_out, size_in) matrix of 1-D linear interpolation weights, as torch's
    ``interpolate(mode="bilinear")`` computes them: with ``align_corners`` the end samples of
    input and output coincide (src = dst · (in − 1)/(out − 1)); without it pixel centres
    coincide (src = (dst + 0.5) · in/out − 0.5, clamped at 0)."""
    a = np.zeros((size_out, size_in))
    if size_in == 1:
        a[:, 0] = 1.0
        return a
    dst = np.arange(size_out, dtype=np.float64)
    if align_corners:
        src = dst * ((size_in - 1) / (size_out - 1)) if size_out > 1 else np.zeros(1)
    else:
        src = np.maximum((dst + 0.5) * (size_in / size_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    rows = np.arange(size_out)
    np.add.at(a, (rows, lo), 1.0 - frac)
    np.add.at(a, (rows, hi), frac)
    return a


def upsample_bilinear(maps: np.ndarray, size: tuple[int, int], align_corners: bool = True) -> np.ndarray:
    """Bilinear upsampling of the last two axes of ``maps`` (…, h, w) to ``size`` (H, W), float64,
    as two matrix products (separable, exact for any ratio)."""
    h, w = maps.shape[-2:]
    ah = bilinear_matrix(h, size[0], align_corners)
    aw = bilinear_matrix(w, size[1], align_corners)
    return np.matmul(np.matmul(ah, np.asarray(maps, np.float64)), aw.T)
