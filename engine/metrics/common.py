"""Plumbing shared by the metric families: maps in every accepted shape, channel reductions,
targets, the model's normalisation and the chunk size that keeps memory flat.

Maps arrive as (N, *input_shape) (like ``x``), (N, h, w) (2-D, at input or mask resolution),
or with a leading axis of M maps per image ((M, N, *input_shape) or (M, N, h, w)): M methods
on the same images, scored in one batched pass. They are handed on channels-first as
float64 (M, N, C, h, w), C = 1 for 2-D maps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.errors import InputError, ParameterError
from engine.perturb import spatial_axes

# What one streamed chunk of perturbed images may hold (float32 inputs; temporaries are a small
# multiple of it). Tests lower it to prove that chunking changes no score.
CHUNK_BYTES = 128 * 1024**2

REDUCTIONS = ("sum", "abs_sum", "abs_of_sum", "max", "max_abs", "per_channel")
SCORES = ("probability", "probability_ratio", "logit")


def parameter_error(name: str, value: Any, allowed: Any) -> ParameterError:
    return ParameterError(f"{name} must be {allowed}; got {value!r}")


def stacked_maps(model: Any, x: np.ndarray, attributions: Any) -> np.ndarray:
    """Attributions as float64 (M, N, C, h, w), channels first (see the module docstring)."""
    if attributions is None:
        raise InputError("this metric needs attribution maps; got attributions=None")
    a = np.asarray(attributions)
    if a.dtype.kind not in "fiub":
        raise InputError(f"attributions must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    n = len(x)
    if a.shape == x.shape:
        a = a[None]
    if a.ndim == x.ndim + 1 and a.shape[1:] == x.shape:
        if model.layout == "NHWC":
            a = np.moveaxis(a, -1, 2)
    elif a.ndim == 3 and a.shape[0] == n:
        a = a[:, None][None]
    elif a.ndim == 4 and a.shape[1] == n:
        a = a[:, :, None]
    else:
        raise InputError(
            f"attributions of shape {a.shape} match none of (N, *input_shape), (N, h, w), "
            f"(M, N, *input_shape), (M, N, h, w) for x of shape {x.shape}"
        )
    if not np.isfinite(a).all():
        raise InputError(f"attributions hold {int((~np.isfinite(a)).sum())} NaN/Inf values")
    h, w = image_size(model, x)
    if a.shape[-2] > h or a.shape[-1] > w:
        raise InputError(f"maps of {a.shape[-2]}×{a.shape[-1]} are larger than the {h}×{w} input")
    return a


def image_size(model: Any, x: np.ndarray) -> tuple[int, int]:
    axes = spatial_axes(model)
    return int(x.shape[axes[0]]), int(x.shape[axes[1]])


def reduce_channels(maps: np.ndarray, rule: str) -> np.ndarray:
    """(M, N, C, h, w) -> (M, N, 1, h, w) by ``rule`` over C: "sum" Σ a, "abs_sum" Σ |a|,
    "abs_of_sum" |Σ a|, "max" max a, "max_abs" max |a|; "per_channel" keeps the C rankings
    (RISE's behaviour on a 3-channel map, specs/metrics.md §2a)."""
    if rule == "sum":
        return maps.sum(axis=2, keepdims=True)
    if rule == "abs_sum":
        return np.abs(maps).sum(axis=2, keepdims=True)
    if rule == "abs_of_sum":
        return np.abs(maps.sum(axis=2, keepdims=True))
    if rule == "max":
        return maps.max(axis=2, keepdims=True)
    if rule == "max_abs":
        return np.abs(maps).max(axis=2, keepdims=True)
    if rule == "per_channel":
        return maps
    raise parameter_error("reduce", rule, f"one of {REDUCTIONS}")


def check_images(model: Any, x: Any) -> np.ndarray:
    """``x`` as a float32 batch of ``model.input_shape`` (-1 or None: a free dimension)."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise InputError(f"x must be a real numeric array, got dtype {x.dtype}")
    shape = tuple(model.input_shape)
    ok = x.ndim == len(shape) + 1 and all(
        d is None or d < 0 or d == e for d, e in zip(shape, x.shape[1:], strict=False)
    )
    if not ok or len(x) == 0:
        raise InputError(
            f"x must be a non-empty batch of shape (N, {', '.join(map(str, shape))}); got {x.shape}"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError(f"x contains {int((~np.isfinite(x)).sum())} NaN/Inf values")
    return x


def targets(model: Any, x: np.ndarray, target: Any, logits: np.ndarray) -> np.ndarray:
    """Class per image (N,) int64: ``target`` (one int or one per image), or, for None, the
    top-1 class of ``logits`` (the model's logits on x)."""
    n, k = len(x), int(model.num_classes)
    if target is None:
        return np.asarray(logits).argmax(axis=1).astype(np.int64)
    t = np.asarray(target)
    if t.dtype.kind not in "iu":
        raise InputError(f"target must be None, an int or one int per image; got {target!r}")
    t = np.full(n, int(t), np.int64) if t.ndim == 0 else t.astype(np.int64)
    if t.shape != (n,):
        raise InputError(f"target must be an int or one class per image ({n}); got shape {t.shape}")
    if t.min() < 0 or t.max() >= k:
        raise InputError(f"target class out of range [0, {k}): {t[(t < 0) | (t >= k)].tolist()}")
    return t


def scores_of(logits: np.ndarray, target: np.ndarray, score: str) -> np.ndarray:
    """float64 (R,): the logit (``score == "logit"``) or the softmax probability of ``target``."""
    z = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(z))
    if score == "logit":
        return z[rows, target]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e[rows, target] / e.sum(axis=1)


def normalisation(model: Any, mean_std: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) per channel of the normalisation the model applies to its input, or None when
    the input is already in the normalised space. ``mean_std`` overrides the metadata
    (``onnxplain.preprocessing`` with ``in_graph`` or ``baked``)."""
    if mean_std is None:
        info = getattr(model, "info", None)
        pre = getattr(info, "preprocessing", None) or {}
        if pre.get("mean") is None or not (pre.get("in_graph") or pre.get("baked")):
            return None
        mean_std = (pre["mean"], pre.get("std") or [1.0])
    try:
        mean, std = (np.asarray(v, np.float64).reshape(-1) for v in mean_std)
    except (TypeError, ValueError) as e:
        raise parameter_error("mean_std", mean_std, "a pair (mean, std) of numbers per channel") from e
    return mean, std


def channel_vector(model: Any, x: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-channel values shaped to broadcast against one image of ``x``."""
    channels = x.shape[1] if model.layout == "NCHW" else x.shape[-1]
    v = np.broadcast_to(np.asarray(values, np.float64).reshape(-1), (channels,))
    return v.reshape(-1, 1, 1) if model.layout == "NCHW" else v.reshape(1, 1, -1)


def chunk_rows(model: Any, row_bytes: int, total: int) -> int:
    """Rows per streamed chunk: as many as ``CHUNK_BYTES`` holds, a multiple of the model's
    ``batch_size`` when it has one (so every runtime call is full), at least one call's worth."""
    rows = max(1, CHUNK_BYTES // max(int(row_bytes), 1))
    batch = getattr(model, "batch_size", None)
    if batch:
        rows = max(int(batch), rows // int(batch) * int(batch))
    return int(min(rows, max(total, 1)))
