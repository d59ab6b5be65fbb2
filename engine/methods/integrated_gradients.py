"""Integrated Gradients (Sundararajan et al. 2017; spec methods.md §4) with optional IDGI (§7)."""

from __future__ import annotations

import numpy as np

from engine.methods.common import Target, path_gradients, prepare
from engine.methods.idgi import idgi as idgi_integrate
from engine.methods.quadrature import alphas_and_weights
from engine.perturb import Baseline, make_baseline
from engine.protocol import ClassifierLike


def integrate_straight_path(
    model: ClassifierLike,
    x: np.ndarray,
    baseline: np.ndarray,
    target: np.ndarray,
    output: str,
    steps: int,
    rule: str,
    idgi: bool,
    with_delta: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """IG (or IDGI) along ``baseline → x`` for a batch, in ONE ``gradient`` call.

    Returns (attributions (N, *s) float64, completeness delta (N,) float64 or None) where
    delta = Σ attr − (f(x) − f(baseline)), with f taken from the same gradient call (for IDGI or
    ``with_delta`` the points alpha = 0 and 1 join the call when the rule lacks them).
    """
    alphas, weights = alphas_and_weights(rule, steps)
    ends = idgi or with_delta
    extra = [a for a in (0.0, 1.0) if ends and not np.any(alphas == a)]
    alphas = np.concatenate([alphas, extra])
    weights = np.concatenate([weights, np.zeros(len(extra))])
    order = np.argsort(alphas, kind="stable")
    alphas, weights = alphas[order], weights[order]
    b64 = baseline.astype(np.float64)
    diff = x.astype(np.float64) - b64
    points = np.empty((len(alphas), *x.shape), dtype=np.float32)  # (P, N, *s), alpha ascending
    for p, a in enumerate(alphas):
        points[p] = b64 + a * diff
    scores, grads = path_gradients(model, points, target, output)
    del points
    if idgi:
        attr = idgi_integrate(grads, scores)
    else:
        acc = np.zeros(x.shape, dtype=np.float64)
        for w, g in zip(weights, grads, strict=True):
            if w != 0:
                acc += w * g
        attr = diff * acc
    if not with_delta:
        return attr, None
    return attr, attr.reshape(len(x), -1).sum(axis=1) - (scores[-1] - scores[0])


def integrated_gradients(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
    baseline: Baseline = "black",
    steps: int = 50,
    rule: str = "right",
    idgi: bool = False,
    return_delta: bool = False,
    blur_sigma: float = 10.0,
    seed: int | None = 0,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Integrated Gradients ``(x − x') ⊙ Σ_i w_i ∂f_c/∂x (x' + α_i (x − x'))``.

    x: (N, *input_shape). baseline: "black" (``input_range`` low), "white", "blur" (``blur_sigma``,
    spatial axes, zero padding), "uniform" (seeded), a number, or an array (one example or like x).
    rule: a quadrature rule from ``engine.methods.quadrature`` — default "right", the paper's
    Riemann sum; "pair" reproduces PAIR saliency (steps=25 there), "gausslegendre" captum.
    idgi: replace the Riemann sum by IDGI on the points (alpha 0 and 1 added), which makes the map
    sum exactly to f(x) − f(x'). All N × steps points go to the model in one call.
    Returns float32 (N, *input_shape), and with ``return_delta`` also the completeness gap
    Σ attr − (f(x) − f(x')) per image (N,), float64.
    """
    x, target = prepare(model, x, target, output)
    base = make_baseline(model, x, baseline, seed=seed, blur_sigma=blur_sigma)
    attr, delta = integrate_straight_path(
        model, x, base, target, output, steps, rule, idgi, with_delta=return_delta
    )
    attr = attr.astype(np.float32)
    return (attr, delta) if return_delta else attr
