"""IDGI: Important Direction Gradient Integration (Yang et al., CVPR 2023; spec methods.md §7).

Each path segment contributes the projection of the change of the score onto the gradient
direction, ``g ⊙ g · Δf / ||g||²``, so the map sums exactly to ``f(end) - f(start)``. Paths are
ordered baseline → input (the last gradient, at the input, is ignored by construction).
Reference: ``idgi.py`` in yangruo1226/IDGI. Unlike the reference, a step whose gradient is exactly
zero (Σg² == 0) is skipped instead of producing NaN; its Δf is then lost from the total.
"""

from __future__ import annotations

import numpy as np


def idgi_step(gradient: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """One segment's contribution, batched: ``g² · Δf / Σg²`` per image.

    gradient: (N, *s) at the segment's start; delta: (N,) = f(segment end) - f(segment start).
    """
    g = np.asarray(gradient, dtype=np.float64)
    q = g * g
    norm = q.reshape(q.shape[0], -1).sum(axis=1)
    scale = np.divide(np.asarray(delta, dtype=np.float64), norm, out=np.zeros_like(norm), where=norm > 0)
    return q * scale.reshape((-1,) + (1,) * (q.ndim - 1))


def idgi(gradients: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """IDGI over a path, batched over images.

    gradients: (P, N, *s) at path points 0..P-1; predictions: (P, N) or (P + 1, N), the score
    f_c at path points 0..P-1 (and P). Segment i pairs ``gradients[i]`` with
    ``predictions[i + 1] - predictions[i]``; with P predictions the last gradient is unused.
    Returns (N, *s) float64.
    """
    gradients = np.asarray(gradients)
    predictions = np.asarray(predictions, dtype=np.float64)
    n_seg = predictions.shape[0] - 1
    if n_seg not in (gradients.shape[0], gradients.shape[0] - 1):
        raise ValueError(f"{gradients.shape[0]} gradients do not match {predictions.shape[0]} predictions")
    out = np.zeros(gradients.shape[1:], dtype=np.float64)
    for i in range(n_seg):
        out += idgi_step(gradients[i], predictions[i + 1] - predictions[i])
    return out


class StreamingIDGI:
    """``idgi`` fed point by point (``engine.methods.stream.Piece``s in path order), holding only
    the previous point's gradients and scores: the same segments, added in the same order, so
    ``total`` equals ``idgi(gradients, predictions)`` bit for bit (the last gradient is unused)."""

    def __init__(self, shape: tuple[int, ...]):
        self.total = np.zeros(shape, dtype=np.float64)
        self._gradient: np.ndarray | None = None  # at the previous point, as the model gave it
        self._score = np.zeros(shape[0], dtype=np.float64)

    def add(self, piece) -> None:
        rows = piece.images
        if self._gradient is None:
            self._gradient = np.empty(self.total.shape, dtype=piece.gradients.dtype)
        if piece.point > 0:
            self.total[rows] += idgi_step(self._gradient[rows], piece.scores - self._score[rows])
        self._gradient[rows] = piece.gradients
        self._score[rows] = piece.scores
