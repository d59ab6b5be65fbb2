"""Step-count sensitivity of a path method (the IDGI study's figure; docs/completeness.md).

``step_sensitivity(model, x, steps=(1, 2, 4, ..., 64))`` runs a path method at every step count
and evaluates metrics on each map. For Integrated Gradients (and IDGI on its points) the path
points of all step counts are pooled: a point shared by several quadratures (the left or right
Riemann sums at 2^k steps nest, and so do trapezoid and PAIR grids at 2^k + 1 points) is
evaluated once, and every step count's sum is accumulated from the pooled gradients, a chunk of
points at a time (memory: one accumulator per step count, not one gradient per point). Any other
method with a ``steps`` parameter (blur_ig, guided_ig) is run once per step count.

The completeness gap Σ attr − (f(x) − f(x')) comes for free with IG: f at α = 0 and 1 joins the
pooled call. Other metrics go through ``engine.evaluate`` with their own parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import ParameterError
from engine.methods.common import check_input, check_output, path_gradients, resolve_target
from engine.methods.idgi import idgi_step
from engine.methods.quadrature import alphas_and_weights
from engine.perturb import make_baseline

_KEY = 1e12  # alphas equal to 12 decimals are one point (linspace and i/n differ in the last bit)


@dataclass
class StepSensitivity:
    """Scores against step counts. scores: metric -> (len(steps), N); delta: the signed
    completeness gap (len(steps), N) (IG only, else None); maps: (len(steps), N, *s) float32 when
    kept; rows: model rows evaluated (gradient rows for IG, pooled) and rows_unpooled: what
    running each step count separately would have cost."""

    method: str
    steps: list[int]
    scores: dict[str, np.ndarray]
    target: np.ndarray
    delta: np.ndarray | None = None
    maps: np.ndarray | None = None
    rows: int = 0
    rows_unpooled: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, the metric's mean over images at each step count)."""
        return np.asarray(self.steps), np.nanmean(self.scores[metric], axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "steps": list(self.steps),
            "scores": {k: v.tolist() for k, v in self.scores.items()},
            "target": self.target.tolist(),
            "delta": None if self.delta is None else self.delta.tolist(),
            "rows": self.rows,
            "rows_unpooled": self.rows_unpooled,
            "params": self.params,
        }


def pooled_integrated_gradients(
    model: Any,
    x: np.ndarray,
    target: np.ndarray,
    steps: Sequence[int],
    *,
    output: str = "probability",
    baseline: Any = "black",
    quadrature: str = "right",
    idgi: bool = False,
    blur_sigma: float = 10.0,
    seed: int | None = 0,
    chunk: int = 32,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """IG (or IDGI) maps at every step count from one pool of path points.

    Returns (maps (len(steps), N, *s) float32, completeness gaps (len(steps), N) float64,
    pooled points, unpooled points). Each map equals ``integrated_gradients(..., steps=n)`` up to
    float64 summation order."""
    base = make_baseline(model, x, baseline, seed=seed, blur_sigma=blur_sigma)
    b64 = base.astype(np.float64)
    diff = x.astype(np.float64) - b64
    grids = []  # per step count: {alpha key: weight}, including the ends (weight 0 if absent)
    alpha_of = {0: 0.0, round(_KEY): 1.0}  # key -> the alpha as the quadrature computed it
    unpooled = 0
    for n in steps:
        alphas, weights = alphas_and_weights(quadrature, n)
        grid = {round(a * _KEY): w for a, w in zip(alphas, weights)}
        for a in alphas:
            alpha_of.setdefault(round(a * _KEY), float(a))
        unpooled += len(grid) + sum(1 for a in (0.0, 1.0) if round(a * _KEY) not in grid and idgi)
        for a in (0.0, 1.0):
            grid.setdefault(round(a * _KEY), 0.0)
        grids.append(grid)
    pool = sorted({k for g in grids for k in g})
    acc = np.zeros((len(steps), *x.shape), dtype=np.float64)
    pending: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(steps)
    ends: dict[int, np.ndarray] = {}
    for start in range(0, len(pool), chunk):
        keys = pool[start : start + chunk]
        points = np.empty((len(keys), *x.shape), dtype=np.float32)
        for p, k in enumerate(keys):
            points[p] = b64 + alpha_of[k] * diff
        scores, grads = path_gradients(model, points, target, output)
        del points
        for p, k in enumerate(keys):
            if k in (0, round(_KEY)):
                ends[k] = scores[p]
            for s, grid in enumerate(grids):
                if k not in grid:
                    continue
                if idgi:  # a segment needs the score at its end: pair the previous point with this one
                    if pending[s] is not None:
                        g_prev, f_prev = pending[s]
                        acc[s] += idgi_step(g_prev, scores[p] - f_prev)
                    pending[s] = (np.array(grads[p], copy=True), scores[p])
                elif grid[k] != 0:
                    acc[s] += grid[k] * grads[p]
    maps = acc if idgi else acc * diff[None]
    delta_f = ends[round(_KEY)] - ends[0]
    gaps = maps.reshape(len(steps), len(x), -1).sum(axis=2) - delta_f[None]
    return maps.astype(np.float32), gaps, len(pool), unpooled


def step_sensitivity(
    model: Any,
    x: np.ndarray,
    *,
    method: str = "integrated_gradients",
    steps: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    target: Any = None,
    output: str = "probability",
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
    method_params: Mapping[str, Any] | None = None,
    keep_maps: bool = False,
    chunk: int = 32,
) -> StepSensitivity:
    """Run ``method`` at each step count in ``steps`` and score every map.

    metrics: metric name -> its parameters for ``engine.evaluate`` (e.g. ``{"insertion":
    {"preset": "idgi"}}``); for integrated_gradients "completeness" is always reported (|gap|,
    from the pooled call). method_params: the method's other parameters (not ``steps``). chunk:
    pooled path points per gradient call (integrated_gradients). keep_maps: return the maps.
    """
    steps = [int(s) for s in steps]
    if not steps or any(s < 1 for s in steps) or len(set(steps)) != len(steps):
        raise ParameterError(f"steps must be distinct positive integers, got {steps}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ParameterError(f"chunk must be a positive integer, got {chunk!r}")
    params = dict(method_params or {})
    if "steps" in params:
        raise ParameterError("give the step counts as steps=, not in method_params")
    from engine.methods import METHODS, explain, method_parameters

    if method not in METHODS or "steps" not in method_parameters(method):
        with_steps = [m for m in METHODS if "steps" in method_parameters(m)]
        raise ParameterError(
            f"method must be one with a steps parameter ({', '.join(with_steps)}), got {method!r}"
        )
    check_output(output)
    x = check_input(model, x)
    target = resolve_target(model, x, target)
    n = len(x)
    delta = None
    if method == "integrated_gradients":
        known = method_parameters(method)
        unknown = sorted(set(params) - set(known))
        if unknown or params.get("return_delta"):
            bad = unknown or ["return_delta"]
            raise ParameterError(f"integrated_gradients: unsupported method_params {bad}")
        kw = {k: params.get(k, known[k]) for k in ("baseline", "quadrature", "idgi", "blur_sigma", "seed")}
        maps, delta, pooled, unpooled = pooled_integrated_gradients(
            model, x, target, steps, output=output, chunk=chunk, **kw
        )
        rows, rows_unpooled = pooled * n, unpooled * n
    else:
        maps = np.stack(
            [
                np.asarray(explain(model, x, method, target=target, output=output, steps=s, **params))
                for s in steps
            ]
        )
        rows = rows_unpooled = 0  # the method's own calls; not counted here
    from engine.metrics import evaluate

    scores: dict[str, np.ndarray] = {}
    if delta is not None:
        scores["completeness"] = np.abs(delta)
    for name, mparams in (metrics or {}).items():
        scores[name] = np.array(
            [[r.score for r in evaluate(model, x, m, name, target=target, **dict(mparams))] for m in maps]
        )
    return StepSensitivity(
        method=method,
        steps=steps,
        scores=scores,
        target=target,
        delta=delta,
        maps=maps if keep_maps else None,
        rows=rows,
        rows_unpooled=rows_unpooled,
        params={
            "output": output,
            "method_params": params,
            "metrics": {k: dict(v) for k, v in (metrics or {}).items()},
        },
    )


__all__ = ["StepSensitivity", "pooled_integrated_gradients", "step_sensitivity"]
