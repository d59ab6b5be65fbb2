"""What every metric shares: the self-describing result record and the metric declaration.

A metric is a plain function ``name(model, x, attributions, target, **params) -> list[MetricResult]``
(one result per image, in order) registered with ``@metric(...)``, which declares, the way Quantus
does, whether a higher score is better and what the metric needs from the model and the maps.
``engine.metrics.METRICS`` maps names to these functions; ``engine.evaluate`` dispatches on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

Needs = Literal["forward", "gradient"]


@dataclass
class MetricResult:
    """One metric on one image (alibi-style: enough to tell what was computed from itself).

    score: the scalar (e.g. an AUC); curve_x / curve_y: the curve it summarises, if any;
    preset: the named preset used (or None); params: every parameter used, defaults included;
    extra: metric-specific values (e.g. the probability-ratio AUC next to the probability AUC).
    """

    metric: str
    score: float
    higher_is_better: bool
    target: int | None = None
    curve_x: np.ndarray | None = None
    curve_y: np.ndarray | None = None
    preset: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays become lists."""
        return json.loads(json.dumps(asdict(self), default=_jsonable))


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON-serialisable: {type(v).__name__}")


def metric(
    *, higher_is_better: bool, needs: Needs = "forward", maps: str = "input"
) -> Callable[[Callable[..., list[MetricResult]]], Callable[..., list[MetricResult]]]:
    """Declare a metric's score direction and needs.

    needs: "forward" (predict only) or "gradient" (a gradient model). maps: what attributions it
    takes: "input" (shaped like x, or 2-D (N, H, W)), "mask" (any resolution, upsampled) or "none".
    """

    def wrap(fn: Callable[..., list[MetricResult]]) -> Callable[..., list[MetricResult]]:
        fn.higher_is_better = higher_is_better  # type: ignore[attr-defined]
        fn.needs = needs  # type: ignore[attr-defined]
        fn.maps = maps  # type: ignore[attr-defined]
        return fn

    return wrap
