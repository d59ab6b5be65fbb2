"""The pointing game (Zhang et al. 2016, Excitation Backprop; specs/metrics.md §7;
docs/metrics-pointing-game.md).

A map points at its maximum; the point is a hit when a ground-truth pixel of the explained class
lies within Euclidean distance ``tolerance`` (strictly less) of it. Accuracy is counted per class,
hits / (hits + misses), and the reported figure is the mean over classes. One result per
(image, class) pair: x holds the image once per class present in it, with the map of that class
and its ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.errors import InputError
from engine.metrics import common
from engine.metrics.base import MetricResult, metric


def _truth(boxes: Any, masks: Any, n: int, h: int, w: int) -> np.ndarray:
    """(n, h, w) bool: the union of each row's boxes, or its mask."""
    if (boxes is None) == (masks is None):
        raise InputError("pointing_game needs exactly one of boxes= or masks=")
    if masks is not None:
        m = np.asarray(masks)
        if m.shape == (h, w):
            m = np.broadcast_to(m, (n, h, w))
        if m.shape != (n, h, w):
            raise common.parameter_error("masks", f"array {m.shape}", f"bool ({n}, {h}, {w})")
        return m.astype(bool)
    if len(boxes) != n:
        raise common.parameter_error("boxes", f"{len(boxes)} entries", f"one list of boxes per row ({n})")
    truth = np.zeros((n, h, w), dtype=bool)
    for i, row in enumerate(boxes):
        b = np.asarray(row, dtype=np.float64).reshape(-1, 4) if len(row) else np.zeros((0, 4))
        if not np.isfinite(b).all() or np.any(b[:, 2] < b[:, 0]) or np.any(b[:, 3] < b[:, 1]):
            raise common.parameter_error("boxes", row, "(x_min, y_min, x_max, y_max) boxes, max >= min")
        for x0, y0, x1, y1 in b.astype(np.int64):
            truth[i, max(y0, 0) : max(y1 + 1, 0), max(x0, 0) : max(x1 + 1, 0)] = True
    return truth


@metric(higher_is_better=True, maps="input")
def pointing_game(
    model: Any,
    x: np.ndarray,
    attributions: Any,
    target: Any = None,
    *,
    boxes: Sequence[Any] | None = None,
    masks: np.ndarray | None = None,
    tolerance: float = 15.0,
    reduce: str = "sum",
    difficult: Sequence[bool] | None = None,
) -> list[MetricResult]:
    """Hit (1.0) or miss (0.0) per row; aggregate with :func:`pointing_accuracy`.

    boxes: per row a list of (x_min, y_min, x_max, y_max) pixel boxes, inclusive, 0-based (VOC's
    are 1-based: subtract 1), of the explained class; or masks: bool (N, H, W). tolerance: in
    pixels, hit when du² + dv² < tolerance² (TorchRay's 15). reduce: the channel rule giving the
    2-D map. The point is the map's maximum, the first in row-major order when several pixels tie
    (TorchRay leaves ties to torch's argmax). difficult: per row, whether it belongs to the
    "difficult" subset (EBP: small objects or several classes), recorded for the aggregation.
    The model is used only to find the top-1 class when ``target`` is None.
    """
    x = common.check_images(model, x)
    if not float(tolerance) >= 0:
        raise common.parameter_error("tolerance", tolerance, "a non-negative number of pixels")
    maps = common.reduce_channels(common.stacked_maps(model, x, attributions), reduce)[:, :, 0]
    n_maps, n = maps.shape[:2]
    h, w = common.image_size(model, x)
    if maps.shape[-2:] != (h, w):
        raise InputError(f"pointing_game needs maps at the input resolution {h}×{w}; got {maps.shape[-2:]}")
    truth = _truth(boxes, masks, n, h, w)
    flags = [False] * n if difficult is None else [bool(d) for d in difficult]
    if len(flags) != n:
        raise common.parameter_error("difficult", difficult, f"one flag per row ({n})")
    tgt = common.targets(model, x, target, model.predict(x) if target is None else None)
    limit = float(tolerance) ** 2
    results = []
    for m in range(n_maps):
        for i in range(n):
            v, u = np.unravel_index(int(np.argmax(maps[m, i])), (h, w))
            rows, cols = np.nonzero(truth[i])
            hit = bool(((rows - v) ** 2 + (cols - u) ** 2 < limit).any()) if rows.size else False
            results.append(
                MetricResult(
                    "pointing_game",
                    float(hit),
                    True,
                    int(tgt[i]),
                    params={
                        "tolerance": float(tolerance),
                        "reduce": reduce,
                        "truth": "boxes" if boxes is not None else "masks",
                    },
                    extra={"map_index": m, "point": [int(v), int(u)], "difficult": flags[i]},
                )
            )
    return results


def pointing_accuracy(results: Sequence[MetricResult], subset: str = "all") -> dict[str, Any]:
    """Per-class accuracy hits / max(hits + misses, 1) and its mean over classes.

    subset: "all" or "difficult" (only rows flagged difficult). Returns {"accuracy": mean over
    the classes seen, "per_class": {class: accuracy}, "counts": {class: (hits, total)}}.
    """
    if subset not in ("all", "difficult"):
        raise common.parameter_error("subset", subset, "'all' or 'difficult'")
    counts: dict[int, list[int]] = {}
    for r in results:
        if subset == "difficult" and not r.extra.get("difficult"):
            continue
        c = counts.setdefault(int(r.target), [0, 0])
        c[0] += int(r.score == 1.0)
        c[1] += 1
    per_class = {k: hits / max(total, 1) for k, (hits, total) in sorted(counts.items())}
    mean = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return {
        "accuracy": mean,
        "per_class": per_class,
        "counts": {k: tuple(v) for k, v in sorted(counts.items())},
    }


__all__ = ["pointing_accuracy", "pointing_game"]
