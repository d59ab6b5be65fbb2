"""Integrated Gradients (Sundararajan et al. 2017; spec methods.md §4) with optional IDGI (§7)."""

from __future__ import annotations

import numpy as np

from engine.methods.common import Target, prepare
from engine.methods.idgi import StreamingIDGI
from engine.methods.quadrature import alphas_and_weights
from engine.methods.stream import stream_gradients
from engine.perturb import Baseline, make_baseline
from engine.protocol import ClassifierLike


def integrate_straight_path(
    model: ClassifierLike,
    x: np.ndarray,
    baseline: np.ndarray,
    target: np.ndarray,
    output: str,
    steps: int,
    quadrature: str,
    idgi: bool,
    with_delta: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """IG (or IDGI) along ``baseline → x`` for a batch, the points streamed to ``model.gradient``
    in chunks of its batch size (``engine.methods.stream``).

    Returns (attributions (N, *s) float64, completeness delta (N,) float64 or None) where
    delta = Σ attr − (f(x) − f(baseline)), with f taken from the same gradient calls (for IDGI or
    ``with_delta`` the points alpha = 0 and 1 join the path when the quadrature lacks them).
    Each point is made, sent and accumulated in alpha order, so memory does not grow with
    ``steps`` and the sums are added in the same order for any chunking.
    """
    alphas, weights = alphas_and_weights(quadrature, steps)
    ends = idgi or with_delta
    extra = [a for a in (0.0, 1.0) if ends and not np.any(alphas == a)]
    alphas = np.concatenate([alphas, extra])
    weights = np.concatenate([weights, np.zeros(len(extra))])
    order = np.argsort(alphas, kind="stable")
    alphas, weights = alphas[order], weights[order]
    b64 = baseline.astype(np.float64)
    diff = x.astype(np.float64) - b64
    points = (b64 + a * diff for a in alphas)  # alpha ascending, float64, cast per chunk
    scores = np.empty((len(alphas), len(x)), dtype=np.float64)
    acc = np.zeros(x.shape, dtype=np.float64)
    path_idgi = StreamingIDGI(x.shape) if idgi else None
    for piece in stream_gradients(model, points, target, output):
        scores[piece.point, piece.images] = piece.scores
        w = weights[piece.point]
        if path_idgi is not None:
            path_idgi.add(piece)
        elif w != 0:
            acc[piece.images] += w * piece.gradients
    attr = path_idgi.total if path_idgi is not None else diff * acc
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
    quadrature: str = "right",
    idgi: bool = False,
    return_delta: bool = False,
    blur_sigma: float = 10.0,
    seed: int | None = 0,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Integrated Gradients ``(x − x') ⊙ Σ_i w_i ∂f_c/∂x (x' + α_i (x − x'))``.

    x: (N, *input_shape). baseline: "black" (``input_range`` low), "white", "blur" (``blur_sigma``,
    spatial axes, zero padding), "uniform" (seeded), a number, or an array (one example or like x).
    quadrature: a rule from ``engine.methods.quadrature`` — default "right", the paper's Riemann
    sum; "pair" reproduces PAIR saliency (steps=25 there), "gausslegendre" captum.
    idgi: replace the Riemann sum by IDGI on the points (alpha 0 and 1 added), which makes the map
    sum exactly to f(x) − f(x'). The N × steps points are streamed to the model in chunks of its
    ``batch_size`` rows (like captum's ``internal_batch_size``), so memory stays flat in steps.
    Returns float32 (N, *input_shape), and with ``return_delta`` also the completeness gap
    Σ attr − (f(x) − f(x')) per image (N,), float64.
    """
    x, target = prepare(model, x, target, output)
    base = make_baseline(model, x, baseline, seed=seed, blur_sigma=blur_sigma)
    attr, delta = integrate_straight_path(
        model, x, base, target, output, steps, quadrature, idgi, with_delta=return_delta
    )
    attr = attr.astype(np.float32)
    return (attr, delta) if return_delta else attr
