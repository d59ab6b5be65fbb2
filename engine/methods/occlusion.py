"""Occlusion (Zeiler & Fergus, ECCV 2014): the score drop when a window of the image is replaced,
as captum ``Occlusion`` and PAIR saliency ``Occlusion`` (spec methods.md §12).

Forward-only: every window of every image goes to ``predict`` in chunks of whole runtime batches.
"""

from __future__ import annotations

import numpy as np

from engine.errors import ParameterError
from engine.methods.common import (
    Target,
    check_input,
    check_output,
    output_scores,
    perturbation_chunk_rows,
    resolve_target,
)
from engine.perturb import Baseline, make_baseline, spatial_axes
from engine.protocol import ClassifierLike

AGGREGATES = ("mean", "sum")


def _pair(value, name: str) -> tuple[int, int]:
    v = (value, value) if np.ndim(value) == 0 else tuple(value)
    if len(v) != 2 or any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) or a < 1 for a in v):
        raise ParameterError(f"occlusion: {name} must be a positive integer or two of them, got {value!r}")
    return int(v[0]), int(v[1])


def window_starts(size: int, window: int, stride: int) -> np.ndarray:
    """Window origins along one axis as captum: ceil((size − window) / stride) + 1 of them, every
    ``stride`` pixels; the last may run past the edge and is then cut at it (so every pixel is
    covered). With stride 1 these are PAIR's positions 0 … size − window, all whole."""
    count = -(-(size - window) // stride) + 1
    return np.arange(count) * stride


def occlusion(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
    window: int | tuple[int, int] = 15,
    stride: int | tuple[int, int] = 8,
    fill: Baseline = 0.0,
    aggregate: str = "mean",
    blur_sigma: float = 10.0,
    seed: int | None = 0,
) -> np.ndarray:
    """Occlusion map: for each window position, d = f_c(x) − f_c(x with the window filled), over
    all channels; each pixel gets the mean of d over the windows covering it (aggregate="mean",
    captum ``Occlusion`` with ``sliding_window_shapes=(C, h, w)``, ``strides=(C, s, s)``) or
    their sum ("sum", PAIR ``Occlusion.GetMask``).

    window, stride: (height, width) or one int for both. Defaults window 15 (PAIR's ``size``) and
    stride 8; PAIR always slides by 1 and captum defaults to 1 (``stride=1, aggregate="sum"`` is
    PAIR exactly), which costs (H − 15 + 1)² forward passes per image. Window origins as captum:
    the last one may stick out and is cut at the border; stride may not exceed the window
    (captum refuses that too: pixels would be left uncovered).
    fill: what the window shows — a number (0.0, PAIR's ``value`` and captum's default
    baseline), a ``make_baseline`` name ("black", "white", "blur" with ``blur_sigma``,
    "uniform" with ``seed``) or an array shaped like one example or like ``x``.
    Returns float32 shaped like ``x``, the same value on every channel of a pixel.
    """
    check_output(output)
    x = check_input(model, x)
    h_ax, w_ax = spatial_axes(model)
    height, width = x.shape[h_ax], x.shape[w_ax]
    wh, ww = _pair(window, "window")
    sh, sw = _pair(stride, "stride")
    if wh > height or ww > width:
        raise ParameterError(f"occlusion: window {(wh, ww)} is larger than the image {(height, width)}")
    if sh > wh or sw > ww:
        raise ParameterError(f"occlusion: stride {(sh, sw)} may not exceed the window {(wh, ww)}")
    if aggregate not in AGGREGATES:
        raise ParameterError(f"occlusion: aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    try:
        base = make_baseline(model, x, fill, seed=seed, blur_sigma=blur_sigma)
    except ValueError as e:
        raise ParameterError(f"occlusion: fill: {e}") from None
    logits = model.predict(x)
    target = resolve_target(model, x, target, logits)
    clean = output_scores(logits, target, output)

    windows = [
        (y, min(y + wh, height), c, min(c + ww, width))
        for y in window_starts(height, wh, sh)
        for c in window_starts(width, ww, sw)
    ]
    n_img = len(x)
    rows_cap = perturbation_chunk_rows(model, x[0].nbytes)
    group = max(1, min(n_img, rows_cap))  # images per chunk
    attr = np.zeros((n_img, height, width), dtype=np.float64)
    counts = np.zeros((height, width), dtype=np.float64)
    for y0, y1, c0, c1 in windows:
        counts[y0:y1, c0:c1] += 1.0

    def region(y0, y1, c0, c1):
        index = [slice(None)] * x.ndim
        index[h_ax], index[w_ax] = slice(y0, y1), slice(c0, c1)
        return tuple(index)

    for g0 in range(0, n_img, group):
        g1 = min(g0 + group, n_img)
        xg, bg, tg = x[g0:g1], base[g0:g1], target[g0:g1]
        per_chunk = max(1, rows_cap // len(xg))  # windows per predict call
        for w0 in range(0, len(windows), per_chunk):
            chunk = windows[w0 : w0 + per_chunk]
            perturbed = np.repeat(xg[None], len(chunk), axis=0)  # (windows, images, *input_shape)
            for j, win in enumerate(chunk):
                r = region(*win)
                perturbed[j][r] = bg[r]
            scores = output_scores(
                model.predict(perturbed.reshape(-1, *x.shape[1:])), np.tile(tg, len(chunk)), output
            ).reshape(len(chunk), len(xg))
            del perturbed
            drops = clean[g0:g1][None] - scores
            for j, (y0, y1, c0, c1) in enumerate(chunk):
                attr[g0:g1, y0:y1, c0:c1] += drops[j][:, None, None]
    if aggregate == "mean":
        attr /= counts
    ch_axes = tuple(a for a in range(1, x.ndim) if a not in (h_ax, w_ax))
    return np.broadcast_to(np.expand_dims(attr.astype(np.float32), ch_axes), x.shape).copy()
