"""iGOS++: I-GOS with bilateral perturbations (Khorram, Lawson, Fuxin Li; ACM CHIL 2021; spec
methods.md §9b). Written from the paper and the spec; IGOS_pp's code is GPL-3.0 and not used.

Two low-resolution masks (1 = keep the image, 0 = perturb) are optimised together:
* a deletion mask M_d: the score of ``b + α·up(M_d)·(x − b)`` (the image faded towards the
  baseline b where M_d is 0) should fall;
* an insertion mask M_i: the score of ``x + α·up(M_i)·(b − x)`` (only where M_i is 0 does the image
  survive) should rise;
* and both terms again on the combined mask up(M_d)·up(M_i), so that the two agree.
The regulariser acts on the combined mask M_d ⊙ M_i, with a bilateral TV term that lets the mask
change where the image has edges. The map is 1 − up(M_d ⊙ M_i).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.errors import ParameterError
from engine.methods.common import Target
from engine.methods.masks import (
    Perturbation,
    apply_preset,
    armijo_line_search,
    bilateral_weights,
    check_line_search,
    check_non_negative,
    check_positive_int,
    heatmap,
    keyword_defaults,
    l1_term,
    setup,
    tv_term,
)
from engine.perturb import Baseline
from engine.protocol import ClassifierLike

IGOS_PP_PRESETS: dict[str, dict[str, Any]] = {"paper": {}}


def igos_pp(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
    preset: str | None = None,
    mask_size: int | Sequence[int] = 28,
    baseline: Baseline = "blur",
    blur_kernel: int = 51,
    blur_sigma: float = 50.0,
    median_kernel: int = 11,
    l1: float = 1.0,
    tv: float = 20.0,
    tv_beta: float = 2.0,
    bilateral_sigma: float = 0.01,
    iterations: int = 15,
    points: int = 20,
    noise_std: float | Sequence[float] = 0.2,
    noise_channels: str | Sequence[int] = "all",
    step: float = 1000.0,
    step_decay: float = 0.2,
    step_floor: float = 1e-5,
    armijo: float = 1e-4,
    seed: int | None = 0,
    return_details: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    """iGOS++ maps 1 − up(M_d ⊙ M_i), float32 shaped like ``x`` (repeated over channels).

    Objective per image, with S_del(U) = Σ_{i=1..P} f(b + (i/P)·U·(x − b) + n)/P and
    S_ins(U) = −Σ_{i=1..P} f(x + (i/P)·U·(b − x) + n)/P (f the ``output`` score of the target, n
    fresh noise as in ``igos``):
        S_del(up M_d) + S_ins(up M_i) + S_del(up M_d · up M_i) + S_ins(up M_d · up M_i) + R(M_d ⊙ M_i),
        R(M) = l1·mean|1 − M| + tv·½(TV_r + TV_c + BTV_r + BTV_c),
    TV as in ``igos`` (exponent ``tv_beta``), BTV the same differences weighted by
    exp(−mean_c(Δx)²/``bilateral_sigma``) of the image sampled at the mask's grid (in the model's
    input units; IGOS_pp uses ImageNet-normalised values, about 4.4× larger for a [0, 1] model).
    Both masks start at ones and move together: one gradient call per iteration for the 4·P
    points of every image, one Armijo line search (``step``, ``step_decay``, ``step_floor``,
    ``armijo``) on the whole objective with fresh noise, one step per image for both masks, then
    clip to [0, 1]. Defaults as ``igos``'s "paper" preset (mask 28, 15 iterations × 20 points,
    λ1 = 1, λ2 = 20, initial step 1000, noise 0.2 on every channel).

    Where we differ from IGOS_pp: the bilateral weights are "square, then mean over channels" for
    rows and columns alike (IGOS_pp averages first for rows); the line search's base value reuses
    the gradient call's scores; each image searches its own step (see ``igos``).
    ``return_details``: also "deletion" and "insertion" masks (iterations, N, h, w) after each
    step, "loss", "step" (iterations, N), and "mask" (N, h, w) the final M_d ⊙ M_i.
    """
    given = dict(locals())
    for key in ("model", "x", "target", "output", "preset", "return_details"):
        given.pop(key)
    p = apply_preset(IGOS_PP_PRESETS, preset, given, IGOS_PP_DEFAULTS)
    ctx = setup(model, x, target, output, p)
    x, target, up, iterations = ctx["x"], ctx["target"], ctx["up"], ctx["iterations"]
    l1, tv, tv_beta = ctx["l1"], ctx["tv"], ctx["tv_beta"]
    n_points = check_positive_int("points", p["points"])
    sigma = check_non_negative("bilateral_sigma", p["bilateral_sigma"])
    if sigma == 0:
        raise ParameterError("bilateral_sigma must be > 0, got 0")
    check_line_search(p["step"], p["step_decay"], p["step_floor"], p["armijo"])

    n, shape = len(x), ctx["shape"]
    deletion = Perturbation(model, ctx["baseline"], x, target, output, ctx["noise_std"], p["seed"])
    insertion = Perturbation(model, x, ctx["baseline"], target, output, ctx["noise_std"], p["seed"])
    insertion.rngs = deletion.rngs  # one noise stream per image for all four terms
    images = x.transpose(0, 3, 1, 2) if model.layout == "NHWC" else x
    w_rows, w_cols = bilateral_weights(images, shape, sigma)
    alphas = np.arange(1, n_points + 1, dtype=np.float64) / n_points
    weights = np.full(n_points, 1.0 / n_points)
    everyone = np.arange(n)

    def reg(masks: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """R of the combined mask (k,) and dR/d(M_d ⊙ M_i) (k, h, w)."""
        v1, g1 = l1_term(masks)
        v2, g2 = tv_term(masks, tv_beta)
        v3, g3 = tv_term(masks, tv_beta, w_rows[idx], w_cols[idx])
        return l1 * v1 + 0.5 * tv * (v2 + v3), l1 * g1 + 0.5 * tv * (g2 + g3)

    def terms(pair: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The four groups of P points (4P, k, C, H, W) and the upsampled masks they used."""
        u_del, u_ins = up(pair[:, 0]), up(pair[:, 1])
        u_both = u_del * u_ins
        noise = deletion.noise(4 * n_points, idx)
        parts = [noise[i * n_points : (i + 1) * n_points] if noise is not None else None for i in range(4)]
        pts = np.concatenate(
            [
                deletion.points(u_del, alphas, idx, parts[0]),
                insertion.points(u_ins, alphas, idx, parts[1]),
                deletion.points(u_both, alphas, idx, parts[2]),
                insertion.points(u_both, alphas, idx, parts[3]),
            ]
        )
        return pts, [u_del, u_ins]

    def objective(pair: np.ndarray, idx: np.ndarray) -> np.ndarray:
        pts, _ = terms(pair, idx)
        s = deletion.scores(pts, idx).reshape(4, n_points, len(idx))
        return weights @ (s[0] - s[1] + s[2] - s[3]) + reg(pair[:, 0] * pair[:, 1], idx)[0]

    pair = np.ones((n, 2, *shape))
    history: dict[str, list] = {"deletion": [], "insertion": [], "loss": [], "step": []}
    for _ in range(iterations):
        pts, (u_del, u_ins) = terms(pair, everyone)
        scores, grads = deletion.gradients(pts, everyone)
        del pts
        scores = scores.reshape(4, n_points, n)
        groups = [grads[i * n_points : (i + 1) * n_points] for i in range(4)]
        d_del = deletion.chain(groups[0], alphas, weights, everyone)
        d_ins = -insertion.chain(groups[1], alphas, weights, everyone)
        d_both = deletion.chain(groups[2], alphas, weights, everyone)
        d_both -= insertion.chain(groups[3], alphas, weights, everyone)
        del grads, groups
        value, d_reg = reg(pair[:, 0] * pair[:, 1], everyone)
        direction = np.stack(
            [
                up.adjoint(d_del + d_both * u_ins) + d_reg * pair[:, 1],
                up.adjoint(d_ins + d_both * u_del) + d_reg * pair[:, 0],
            ],
            axis=1,
        )
        base = weights @ (scores[0] - scores[1] + scores[2] - scores[3]) + value
        pair, steps, _ = armijo_line_search(
            objective,
            pair,
            direction,
            base,
            step=p["step"],
            decay=p["step_decay"],
            floor=p["step_floor"],
            armijo=p["armijo"],
        )
        for key, v in (("deletion", pair[:, 0]), ("insertion", pair[:, 1]), ("loss", base), ("step", steps)):
            history[key].append(np.array(v))

    combined = pair[:, 0] * pair[:, 1]
    heat = heatmap(up, combined, x, ctx["ch_ax"])
    if not return_details:
        return heat
    details = {k: np.stack(v) if v else np.zeros((0, n)) for k, v in history.items()}
    details["mask"] = combined
    return heat, details


IGOS_PP_DEFAULTS = keyword_defaults(igos_pp)
