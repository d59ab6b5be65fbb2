"""Guided Integrated Gradients (Kapishnikov et al., CVPR 2021; spec methods.md §6)."""

from __future__ import annotations

import contextlib
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine.methods.common import Target, output_scores, prepare
from engine.methods.idgi import idgi_step
from engine.perturb import Baseline, make_baseline
from engine.protocol import ClassifierLike

_EPSILON = 1e-9


def _advance(
    x: np.ndarray,
    x_in: np.ndarray,
    x_base: np.ndarray,
    g_act: np.ndarray,
    step: int,
    steps: int,
    l1_total: float,
    fraction: float,
    max_dist: float,
) -> np.ndarray:
    """One Guided IG step for ONE image (flat float64 arrays), exactly PAIR's ``guided_ig_impl``
    inner loop. Moves ``x`` in place; returns the attribution increment Σ (x − x_old) ⊙ g_act."""
    grad = g_act.copy()
    attr = np.zeros_like(x)
    alpha = (step + 1.0) / steps
    alpha_min, alpha_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
    x_min = x_base + (x_in - x_base) * alpha_min
    x_max = x_base + (x_in - x_base) * alpha_max
    l1_target = l1_total * (1 - (step + 1) / steps)
    gamma = np.inf
    while gamma > 1.0:
        x_old = x.copy()
        with np.errstate(divide="ignore", invalid="ignore"):
            x_alpha = np.where(x_in - x_base != 0, (x - x_base) / (x_in - x_base), np.nan)
        x_alpha[np.isnan(x_alpha)] = alpha_max
        behind = x_alpha < alpha_min
        x[behind] = x_min[behind]  # laggards join the lower bound of the allowed band
        l1_current = np.abs(x - x_in).sum()
        if math.isclose(l1_target, l1_current, rel_tol=_EPSILON, abs_tol=_EPSILON):
            attr += (x - x_old) * g_act
            break
        grad[x == x_max] = np.inf  # features at the upper bound can no longer be selected
        threshold = np.quantile(np.abs(grad), fraction, method="lower")
        s = np.logical_and(np.abs(grad) <= threshold, grad != np.inf)
        l1_s = (np.abs(x - x_max) * s).sum()
        gamma = (l1_current - l1_target) / l1_s if l1_s > 0 else np.inf
        if gamma > 1.0:
            x[s] = x_max[s]
        else:
            if not gamma > 0:
                raise FloatingPointError(f"Guided IG step {step}: non-positive gamma {gamma}")
            x[s] = (x + (x_max - x) * gamma)[s]
        attr += (x - x_old) * g_act
    return attr


def guided_ig(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
    baseline: Baseline = "black",
    steps: int = 200,
    fraction: float = 0.25,
    max_dist: float = 0.02,
    idgi: bool = False,
    blur_sigma: float = 10.0,
    seed: int | None = 0,
) -> np.ndarray:
    """Guided IG: at each of ``steps`` steps, move the ``fraction`` of features with the smallest
    |gradient| towards the input, staying within ``max_dist`` (in alpha) of the straight line.

    Exactly PAIR ``guided_ig_impl`` in float64 (``np.quantile(method="lower")``), with all images
    advancing together: ONE gradient call per step for the whole batch, the per-image
    sub-iterations in numpy. Baselines as in ``integrated_gradients`` (default black = input_range
    low; PAIR's default is zeros). idgi: IDGI on the path points x_0..x_{steps-1} plus the end
    point x, whose score comes from one extra forward call (spec §7, last segment included).
    Returns float32 (N, *input_shape).
    """
    x, target = prepare(model, x, target, output)
    n = x.shape[0]
    x_in = x.reshape(n, -1).astype(np.float64)
    x_base = make_baseline(model, x, baseline, seed=seed, blur_sigma=blur_sigma)
    x_base = x_base.reshape(n, -1).astype(np.float64)
    l1_total = np.abs(x_in - x_base).sum(axis=1)
    cur = x_base.copy()
    attr = np.zeros_like(x_in)
    prev_g = prev_f = None
    rows = [i for i in range(n) if l1_total[i] != 0]  # input == baseline: zero attribution
    # images are independent: their numpy sub-steps run in threads (numpy releases the GIL in its
    # loops), each thread writing only its own rows, so the bits do not depend on the thread count
    workers = min(n, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for step in range(steps):
            f, g = model.gradient(cur.reshape(x.shape).astype(np.float32), target, output=output)
            g = np.asarray(g, dtype=np.float64).reshape(n, -1)
            f = np.asarray(f, dtype=np.float64)
            if idgi and prev_g is not None:
                attr += idgi_step(prev_g, f - prev_f)

            def advance(i, g=g, step=step):
                return _advance(
                    cur[i], x_in[i], x_base[i], g[i], step, steps, l1_total[i], fraction, max_dist
                )

            incs = list(pool.map(advance, rows)) if pool else [advance(i) for i in rows]
            if not idgi:
                for i, inc in zip(rows, incs):
                    attr[i] += inc
            prev_g, prev_f = g, f
    if idgi and prev_g is not None:
        f_end = output_scores(model.predict(x), target, output)  # only the score is needed
        attr += idgi_step(prev_g, f_end - prev_f)
    attr[l1_total == 0] = 0.0
    return attr.reshape(x.shape).astype(np.float32)
