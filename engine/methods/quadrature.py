"""Quadrature rules for path integrals over alpha in [0, 1] (spec methods.md §4).

Like captum's ``approximation_methods``: each rule (the path methods' ``quadrature`` parameter)
gives the points ``alphas`` and the weights, and the integral of h over [0, 1] is approximated by
``sum(weights * h(alphas))``.

Rules (n = steps):
  left          alphas i/n, i = 0..n-1, weights 1/n
  right         alphas i/n, i = 1..n, weights 1/n (the IG paper's Riemann sum, Sundararajan 2017 §5)
  midpoint      alphas (i + 1/2)/n, weights 1/n
  trapezoid     composite trapezoid on linspace(0, 1, n): weights 1/(n-1), halved at both ends
  gausslegendre numpy ``leggauss`` nodes mapped to [0, 1] and weights halved (captum's default)
  pair          PAIR saliency: linspace(0, 1, n) incl. both ends, weights 1/n (sum (n)/n over n
                points spanning n-1 intervals: not a standard rule, kept for parity)
  captum_trapezoid  captum's ``riemann_trapezoid``: linspace(0, 1, n), weights 1/n halved at both
                ends (they sum to (n-1)/n; kept for parity only)
"""

from __future__ import annotations

import numpy as np

QUADRATURES: tuple[str, ...] = (
    "left",
    "right",
    "midpoint",
    "trapezoid",
    "gausslegendre",
    "pair",
    "captum_trapezoid",
)


def alphas_and_weights(quadrature: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas (steps,), weights (steps,)), float64, alphas ascending."""
    n = int(steps)
    if n != steps or n < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if quadrature == "left":
        return np.arange(n) / n, np.full(n, 1.0 / n)
    if quadrature == "right":
        return np.arange(1, n + 1) / n, np.full(n, 1.0 / n)
    if quadrature == "midpoint":
        return (np.arange(n) + 0.5) / n, np.full(n, 1.0 / n)
    if quadrature == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (1.0 + nodes), 0.5 * weights
    if quadrature in ("trapezoid", "pair", "captum_trapezoid"):
        if n < 2:
            raise ValueError(f"quadrature {quadrature!r} needs steps >= 2 (it includes both ends)")
        alphas = np.linspace(0.0, 1.0, n)
        if quadrature == "pair":
            return alphas, np.full(n, 1.0 / n)
        w = np.full(n, 1.0 / (n - 1) if quadrature == "trapezoid" else 1.0 / n)
        w[0] /= 2
        w[-1] /= 2
        return alphas, w
    raise ValueError(f"unknown quadrature {quadrature!r}; known: {', '.join(QUADRATURES)}")
