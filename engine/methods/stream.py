"""Streaming path points through ``model.gradient`` chunk by chunk (issue #9 §3).

A path method needs the gradient at P points × N images. Stacking them all (P, N, *s) makes peak
memory grow with steps × images (IG on 4 photos: 1.07 GB at 64 steps, 3.18 GB at 512). Here the
points are generated one at a time (each an (N, *s) batch), copied into a fixed buffer of
``rows`` rows, and each full buffer goes to ``model.gradient``; the gradients come back piece by
piece, in the order the points were generated, for the caller to accumulate and drop. Peak memory
is then one point (N images), one chunk of points and one chunk of gradients, whatever P.

Row order is the one of the stacked computation (point-major, image-minor: the rows of
``points.reshape(P * N, *s)``), so a caller that accumulates each piece as it comes adds the
terms of every output element in the same order as before: the results are bit-identical for
any chunking, provided the model gives each row the same values whatever batch it came in
(true for the closed-form test models; a runtime may pick other kernels for other batch sizes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from engine.protocol import ClassifierLike

DEFAULT_ROWS = 256  # rows per call for a model that sets no batch_size (batch_size None)


class Piece(NamedTuple):
    """Gradients of one point for the images ``images`` (a slice of the batch)."""

    point: int  # index of the point in generation order
    images: slice  # which images of the batch
    scores: np.ndarray  # (len, ) float64
    gradients: np.ndarray  # (len, *s) as the model gives them (float32 for a Classifier)


def chunk_rows(model: ClassifierLike) -> int:
    """Rows per ``gradient`` call: the model's ``batch_size`` (the Classifier derives it from
    ONNXPLAIN_MEMORY_BUDGET, so one call is one runtime run), else ``DEFAULT_ROWS``."""
    size = getattr(model, "batch_size", None)
    return int(size) if size else DEFAULT_ROWS


def stream_gradients(
    model: ClassifierLike,
    points: Iterable[np.ndarray],
    target: np.ndarray,
    output: str,
    rule: str = "gradient",
    rows: int | None = None,
) -> Iterator[Piece]:
    """Gradients at each point of ``points`` (an iterable of (N, *s) batches, N = len(target)),
    explaining ``target`` (N,) — the rows of the stacked call, sent ``rows`` at a time.

    Yields ``Piece``s in generation order: point 0 images 0.., point 1 ..., a point split where a
    chunk ends. A point is cast to float32 as it is copied into the buffer (the stacked code
    assigned it into a float32 stack: the same rounding). The yielded arrays stay valid after
    the next chunk is sent (each call returns new arrays).
    """
    rows = int(rows or chunk_rows(model))
    target = np.asarray(target)
    n = len(target)
    buf: np.ndarray | None = None
    todo: list[tuple[int, int, int]] = []  # (point, first image, last image + 1) in the buffer
    fill = 0

    def send() -> Iterator[Piece]:
        assert buf is not None
        tgt = np.concatenate([target[a:b] for _, a, b in todo])
        scores, grads = model.gradient(buf[:fill], tgt, output=output, rule=rule)
        scores = np.asarray(scores, dtype=np.float64)
        grads = np.asarray(grads)
        at = 0
        for p, a, b in todo:
            yield Piece(p, slice(a, b), scores[at : at + b - a], grads[at : at + b - a])
            at += b - a

    for p, point in enumerate(points):
        if buf is None:
            buf = np.empty((rows, *point.shape[1:]), dtype=np.float32)
        i = 0
        while i < n:
            take = min(rows - fill, n - i)
            buf[fill : fill + take] = point[i : i + take]
            todo.append((p, i, i + take))
            fill += take
            i += take
            if fill == rows:
                yield from send()
                todo, fill = [], 0
    if fill:
        yield from send()
