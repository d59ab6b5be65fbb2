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


def path_gradients(
    model: ClassifierLike,
    points: np.ndarray,
    target: np.ndarray,
    output: str,
    rule: str = "gradient",
) -> tuple[np.ndarray, np.ndarray]:
    """One ``gradient`` call for a stack of points (P, N, *s) explaining ``target`` (N,). The
    methods stream instead (``engine.methods.stream``); the step-sensitivity metric sends its
    pooled points through this a chunk at a time.

    Returns (scores (P, N) float64, gradients (P, N, *s) as the model gives them, float32 for a
    Classifier); callers accumulate in float64 point by point, so no float64 copy of the whole
    stack is made.
    """
    p, n = points.shape[:2]
    rows = points.reshape(p * n, *points.shape[2:]).astype(np.float32, copy=False)
    scores, grads = model.gradient(rows, np.tile(target, p), output=output, rule=rule)
    return np.asarray(scores, dtype=np.float64).reshape(p, n), np.asarray(grads).reshape(points.shape)


# Perturbed copies (RISE masks, occlusion windows) are built and sent to ``predict`` in chunks of
# at most this many input bytes, so memory stays flat however many masks or windows are asked for.
PERTURBATION_CHUNK_BYTES = 256 * 1024**2


def perturbation_chunk_rows(model: ClassifierLike, example_bytes: int) -> int:
    """Rows of perturbed inputs per ``predict`` call: a whole number of the model's runtime batches
    (``batch_size``, which the Classifier derives from its memory budget) within
    ``PERTURBATION_CHUNK_BYTES``; at least one batch, at least one row."""
    cap = max(1, PERTURBATION_CHUNK_BYTES // max(int(example_bytes), 1))
    batch = getattr(model, "batch_size", None)
    if not batch:
        return cap
    return int(batch) * max(1, cap // int(batch))
