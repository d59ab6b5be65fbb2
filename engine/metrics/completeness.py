"""Completeness of path attributions (Sundararajan et al. 2017, axiom; docs/completeness.md).

A path method's map should sum to the change of the explained score along its path:
Σ attribution = f(x) − f(x'). The score is the gap |Σ attribution − (f(x) − f(x'))| per image;
``extra["relative"]`` divides it by |f(x) − f(x')| (inf when that is 0 and the gap is not).
IG with a Riemann rule satisfies it only up to discretisation (PAIR's linspace weights by
design over-count one interval, methods.md §4); IDGI satisfies it exactly (§7); Blur IG's path
ends at the blurred image, so its baseline is ``"blur"`` with the method's ``max_sigma``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.errors import ParameterError
from engine.methods.common import check_input, check_output, output_scores, resolve_target
from engine.metrics.base import MetricResult, metric
from engine.perturb import Baseline, make_baseline


@metric(higher_is_better=False, needs="forward", maps="input")
def completeness(
    model: Any,
    x: np.ndarray,
    attributions: np.ndarray,
    target: Any = None,
    *,
    output: str = "probability",
    baseline: Baseline = "black",
    blur_sigma: float = 10.0,
    seed: int | None = 0,
) -> list[MetricResult]:
    """|Σ attribution − (f(x) − f(baseline))| per image, f the explained ``output`` of the target
    class (None: top-1 on ``x``). attributions: shaped like ``x`` (summed over every axis).
    baseline, blur_sigma, seed: as the path method's (``engine.perturb.make_baseline``).
    One ``predict`` call for the images and their baselines. extra: "relative" (the gap over
    |f(x) − f(baseline)|), "sum" (Σ attribution) and "delta_f" (f(x) − f(baseline))."""
    check_output(output)
    x = check_input(model, x)
    if attributions is None:
        raise ParameterError("completeness needs the attributions (shaped like x)")
    a = np.asarray(attributions, dtype=np.float64)
    if a.shape != x.shape:
        raise ParameterError(f"attributions must be shaped like x {x.shape}, got {a.shape}")
    base = make_baseline(model, x, baseline, seed=seed, blur_sigma=blur_sigma)
    logits = np.asarray(model.predict(np.concatenate([x, base])), dtype=np.float64)
    t = resolve_target(model, x, target, logits[: len(x)])
    f = output_scores(logits, np.concatenate([t, t]), output)
    delta_f = f[: len(x)] - f[len(x) :]
    total = a.reshape(len(x), -1).sum(axis=1)
    gap = np.abs(total - delta_f)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(gap == 0, 0.0, gap / np.abs(delta_f))
    used = {"output": output, "baseline": baseline if isinstance(baseline, (str, int, float)) else "array"}
    used.update(blur_sigma=blur_sigma, seed=seed)
    return [
        MetricResult(
            metric="completeness",
            score=float(gap[i]),
            higher_is_better=False,
            target=int(t[i]),
            params=used,
            extra={"relative": float(relative[i]), "sum": float(total[i]), "delta_f": float(delta_f[i])},
        )
        for i in range(len(x))
    ]


__all__ = ["completeness"]
