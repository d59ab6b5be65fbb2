"""Meaningful perturbation ("mask"; Fong & Vedaldi, ICCV 2017; spec methods.md §10).

A low-resolution deletion mask M (1 = keep, 0 = show the blurred image) is optimised with Adam so
that the explained score of ``x ⊙ up(M) + b ⊙ (1 − up(M)) + n`` falls while M stays mostly ones
and smooth. Settings of the PyTorch port the I-GOS code derives from (jacobgil/pytorch-explain-black-box,
MIT): 28×28 mask, Adam lr 0.1, 500 iterations, λ1 = 0.01, λTV = 0.2, TV exponent 3, the
median-blurred image (11×11) as the baseline. The map is 1 − up(M).
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
    check_non_negative,
    heatmap,
    keyword_defaults,
    regulariser,
    setup,
)
from engine.perturb import Baseline
from engine.protocol import ClassifierLike

# "reference": the port's noise, N(0, 0.2²) on channel 0 only (OpenCV's randn given a scalar).
MASK_PRESETS: dict[str, dict[str, Any]] = {"paper": {}, "reference": {"noise_channels": (0,)}}


def meaningful_perturbation(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
    preset: str | None = None,
    mask_size: int | Sequence[int] = 28,
    baseline: Baseline = "median",
    blur_kernel: int = 51,
    blur_sigma: float = 50.0,
    median_kernel: int = 11,
    l1: float = 0.01,
    tv: float = 0.2,
    tv_beta: float = 3.0,
    iterations: int = 500,
    learning_rate: float = 0.1,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    noise_std: float | Sequence[float] = 0.2,
    noise_channels: str | Sequence[int] = "all",
    seed: int | None = 0,
    return_details: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    """Meaningful-perturbation maps 1 − up(M), float32 shaped like ``x`` (repeated over channels).

    Loss per image: l1·mean|1 − M| + tv·TV_β(M) + f(x ⊙ up(M) + b ⊙ (1 − up(M)) + n), TV and the
    upsampling as ``igos`` (β = ``tv_beta``), f the ``output`` score, n fresh Gaussian noise each
    iteration (``noise_std`` in the model's input units on ``noise_channels``; the port adds 0.2 in
    ImageNet-normalised units on channel 0 only: preset "reference"). Each of ``iterations`` steps
    is one ``gradient`` call for all images, then torch's Adam update (``learning_rate``,
    ``adam_betas``, ``adam_eps``, bias-corrected, no weight decay) and clip to [0, 1].
    baseline: "median" (``median_kernel``, the port's optimisation baseline), "blur", "mixed" (the
    port's display image) or any ``make_baseline`` value. The map is not min-max normalised.
    ``return_details``: also "loss" and "score" (iterations, N) at the start of each step and "mask".
    """
    given = dict(locals())
    for key in ("model", "x", "target", "output", "preset", "return_details"):
        given.pop(key)
    p = apply_preset(MASK_PRESETS, preset, given, MASK_DEFAULTS)
    ctx = setup(model, x, target, output, p)
    x, up, iterations = ctx["x"], ctx["up"], ctx["iterations"]
    lr = check_non_negative("learning_rate", p["learning_rate"])
    try:
        beta1, beta2 = (float(b) for b in p["adam_betas"])
    except (TypeError, ValueError):
        beta1 = beta2 = float("nan")
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ParameterError(f"adam_betas must be two numbers in [0, 1), got {p['adam_betas']!r}")
    eps = check_non_negative("adam_eps", p["adam_eps"])

    n = len(x)
    pert = Perturbation(model, ctx["baseline"], x, ctx["target"], output, ctx["noise_std"], p["seed"])
    everyone, one = np.arange(n), np.ones(1)
    masks = np.ones((n, *ctx["shape"]))
    first, second = np.zeros_like(masks), np.zeros_like(masks)
    history: dict[str, list] = {"loss": [], "score": []}
    for t in range(1, iterations + 1):
        pts = pert.points(up(masks), one, everyone, pert.noise(1, everyone))
        score, d_up = pert.score_and_grad(pts, one, one, everyone)
        reg, d_reg = regulariser(masks, ctx["l1"], ctx["tv"], ctx["tv_beta"])
        grad = up.adjoint(d_up) + d_reg
        # torch.optim.Adam's update, in its order of operations
        first = beta1 * first + (1 - beta1) * grad
        second = beta2 * second + (1 - beta2) * grad * grad
        denom = np.sqrt(second) / np.sqrt(1 - beta2**t) + eps
        masks = np.clip(masks - (lr / (1 - beta1**t)) * first / denom, 0.0, 1.0)
        history["loss"].append(reg + score)
        history["score"].append(score)

    heat = heatmap(up, masks, x, ctx["ch_ax"])
    if not return_details:
        return heat
    details = {k: np.stack(v) if v else np.zeros((0, n)) for k, v in history.items()}
    details["mask"] = masks
    return heat, details


MASK_DEFAULTS = keyword_defaults(meaningful_perturbation)
