"""Shared plumbing for the attribution methods: input checks, targets, baselines, blur, batching.

Every method receives a batch ``x`` of shape ``(N, *model.input_shape)`` and hands the points it
needs (path points x classes x images) to the model in as few ``gradient`` calls as possible; the
model (``engine.model.Classifier``) splits big batches to its memory budget itself. Path methods
stream their points in chunks of the model's batch size (``engine.methods.stream``) so that
memory does not grow with steps or samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.protocol import OUTPUTS, ClassifierLike

Target = int | Sequence[int] | np.ndarray | None


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
