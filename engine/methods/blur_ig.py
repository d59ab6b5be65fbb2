"""Blur IG: integrated gradients along a Gaussian-blur path (Xu et al., CVPR 2020; spec §5)."""

from __future__ import annotations

import math

import numpy as np

from engine.methods.common import Target, path_gradients, prepare
from engine.methods.idgi import idgi as idgi_integrate
from engine.perturb import gaussian_blur, spatial_axes
from engine.protocol import ClassifierLike


def blur_ig(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
    max_sigma: float = 50.0,
    steps: int = 100,
    grad_step: float = 0.01,
    sqrt: bool = False,
    idgi: bool = False,
) -> np.ndarray:
    """Blur IG as PAIR ``BlurIG.GetMask`` computes it, batched.

    σ_i = i·max_sigma/steps (or its square root with ``sqrt``), i = 0..steps; the points
    x_i = blur(x, σ_i) for i < steps, the path derivative by a forward difference
    (blur(x, σ_i + grad_step) − x_i)/grad_step, and the result −Σ_i (σ_{i+1} − σ_i) ∂x_i ⊙ ∂f_c(x_i)
    (the path runs input → blurred; the sign orients it blurred → input). The blur is
    ``scipy.ndimage.gaussian_filter`` on the two spatial axes of the model's layout, zero padding.
    Each step uses its own σ_{i+1} − σ_i (PAIR with batch_size > 1 uses the last one of the batch,
    wrong for sqrt=True). All N × steps points go to the model in one call.
    idgi: IDGI on the points ordered blurred → input (σ_{steps-1} … σ_0, spec §7).
    Returns float32 (N, *input_shape).
    """
    x, target = prepare(model, x, target, output)
    axes = spatial_axes(model)
    if sqrt:
        sigmas = [math.sqrt(float(i) * max_sigma / float(steps)) for i in range(steps + 1)]
    else:
        sigmas = [float(i) * max_sigma / float(steps) for i in range(steps + 1)]
    points = np.stack([gaussian_blur(x, s, axes) for s in sigmas[:-1]])  # (steps, N, *s), float32
    scores, grads = path_gradients(model, points, target, output)
    if idgi:
        return idgi_integrate(grads[::-1], scores[::-1]).astype(np.float32)
    acc = np.zeros(x.shape, dtype=np.float64)
    for i in range(steps):
        moved = gaussian_blur(x, sigmas[i] + grad_step, axes)
        dx = np.subtract(moved, points[i], dtype=np.float64) / grad_step
        acc += (sigmas[i + 1] - sigmas[i]) * dx * grads[i]
    return (-acc).astype(np.float32)
