"""Shared plumbing for the attribution methods: input checks, targets, baselines, blur, batching.

Every method receives a batch ``x`` of shape ``(N, *model.input_shape)`` and hands all the points it
needs (path points x classes x images) to the model in as few ``gradient`` calls as possible; the
model (``engine.model.Classifier``) splits big batches to its memory budget itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from engine.protocol import OUTPUTS, ClassifierLike

Target = int | Sequence[int] | np.ndarray | None
Baseline = str | float | np.ndarray


def check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


def check_input(model: ClassifierLike, x: Any) -> np.ndarray:
    """Return ``x`` as float32 after checking it is a finite batch of ``model.input_shape``.

    ``None`` or a negative entry in ``input_shape`` is a free (dynamic) dimension.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"x must be a real numeric array, got dtype {x.dtype}")
    shape = tuple(model.input_shape)
    ok = x.ndim == len(shape) + 1 and all(
        d is None or d < 0 or d == e for d, e in zip(shape, x.shape[1:], strict=False)
    )
    if not ok:
        raise ValueError(
            f"x must be a batch of model inputs, shape (N, {', '.join(map(str, shape))}); got {x.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"x contains {int((~np.isfinite(x)).sum())} NaN/Inf values")
    return x


def resolve_target(
    model: ClassifierLike, x: np.ndarray, target: Target, logits: np.ndarray | None = None
) -> np.ndarray:
    """Class per image, int64 (N,). ``None``: the top-1 prediction (uses ``logits`` if given)."""
    n, k = x.shape[0], int(model.num_classes)
    if target is None:
        if logits is None:
            logits = model.predict(x)
        return np.asarray(logits).argmax(axis=1).astype(np.int64)
    t = np.asarray(target)
    if t.dtype.kind not in "iu" and not (
        t.dtype.kind == "f" and np.all(np.isfinite(t)) and np.all(t == np.round(t))
    ):
        raise TypeError(f"target must be None, an int or one int per image; got {target!r}")
    t = t.astype(np.int64)
    if t.ndim == 0:
        t = np.full(n, int(t), dtype=np.int64)
    if t.shape != (n,):
        raise ValueError(f"target must be an int or one class per image ({n}); got shape {t.shape}")
    if t.min() < 0 or t.max() >= k:
        raise ValueError(f"target class out of range [0, {k}): {t[(t < 0) | (t >= k)].tolist()}")
    return t


def prepare(model: ClassifierLike, x: Any, target: Target, output: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``x`` and ``output``; resolve ``target``. Returns (x float32, target int64 (N,))."""
    check_output(output)
    x = check_input(model, x)
    return x, resolve_target(model, x, target)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def output_scores(logits: np.ndarray, target: np.ndarray, output: str) -> np.ndarray:
    """The explained score from logits, computed in float64: logit, softmax or log-softmax."""
    z = np.asarray(logits, dtype=np.float64)
    rows = np.arange(z.shape[0])
    if output == "logit":
        return z[rows, target]
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return log_p[rows, target] if output == "log_probability" else np.exp(log_p[rows, target])


def path_gradients(
    model: ClassifierLike,
    points: np.ndarray,
    target: np.ndarray,
    output: str,
    rule: str = "gradient",
) -> tuple[np.ndarray, np.ndarray]:
    """One ``gradient`` call for a stack of points (P, N, *s) explaining ``target`` (N,).

    Returns (scores (P, N) float64, gradients (P, N, *s) as the model gives them, float32 for a
    Classifier); callers accumulate in float64 point by point, so no float64 copy of the whole
    stack is made.
    """
    p, n = points.shape[:2]
    rows = points.reshape(p * n, *points.shape[2:]).astype(np.float32, copy=False)
    scores, grads = model.gradient(rows, np.tile(target, p), output=output, rule=rule)
    return np.asarray(scores, dtype=np.float64).reshape(p, n), np.asarray(grads).reshape(points.shape)


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
