"""Blur IG: integrated gradients along a Gaussian-blur path (Xu et al., CVPR 2020; spec §5)."""

from __future__ import annotations

import math

import numpy as np

from engine.methods.common import Target, prepare
from engine.methods.idgi import StreamingIDGI
from engine.methods.stream import stream_gradients
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
    wrong for sqrt=True). The N × steps points are streamed to the model in chunks of its
    ``batch_size`` rows, one blurred point at a time, so memory stays flat in steps.
    idgi: IDGI on the points ordered blurred → input (σ_{steps-1} … σ_0, spec §7).
    Returns float32 (N, *input_shape).
    """
    x, target = prepare(model, x, target, output)
    axes = spatial_axes(model)
    if sqrt:
        sigmas = [math.sqrt(float(i) * max_sigma / float(steps)) for i in range(steps + 1)]
    else:
        sigmas = [float(i) * max_sigma / float(steps) for i in range(steps + 1)]
    if idgi:  # IDGI integrates blurred → input: make the points in that order (σ_{steps-1} … σ_0)
        path_idgi = StreamingIDGI(x.shape)
        points = (gaussian_blur(x, sigmas[i], axes) for i in range(steps - 1, -1, -1))
        for piece in stream_gradients(model, points, target, output):
            path_idgi.add(piece)
        return path_idgi.total.astype(np.float32)
    acc = np.zeros(x.shape, dtype=np.float64)
    made = {}  # points made but not yet reached by a returned chunk (at most ~one chunk of rows)

    def point(i: int) -> np.ndarray:
        made[i] = gaussian_blur(x, sigmas[i], axes)  # float32, (N, *s)
        return made[i]

    dx = None
    for piece in stream_gradients(model, (point(i) for i in range(steps)), target, output):
        i, rows = piece.point, piece.images
        if i in made:  # first piece of point i: its path derivative for all N images
            moved = gaussian_blur(x, sigmas[i] + grad_step, axes)
            dx = np.subtract(moved, made.pop(i), dtype=np.float64) / grad_step
        acc[rows] += (sigmas[i + 1] - sigmas[i]) * dx[rows] * piece.gradients
    return (-acc).astype(np.float32)
