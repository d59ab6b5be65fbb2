"""Shared pieces of the mask-optimisation methods (I-GOS, iGOS++, meaningful perturbation).

* ``Upsampler``: bilinear upsampling of low-resolution masks with ``align_corners=True`` (torch's
  ``UpsamplingBilinear2d``, which every reference uses) as two small interpolation matrices, and
  its exact adjoint (the transposed matrices), which carries image-space gradients back to the mask.
* Regularisers on masks (N, h, w) with their gradients: L1 ``mean|1 − M|``, total variation
  ``mean|ΔM|^β`` along rows and columns, and the bilateral TV of iGOS++.
* ``Perturbation``: the perturbed inputs ``start + α·up(M)·(end − start) + noise`` of a batch of
  images, their scores (forward only) and the gradient of a weighted sum of scores with respect
  to ``up(M)`` (one ``gradient`` call for all points of all images: the chain rule through the
  perturbation is ``Σ_c ∂f/∂x_c · α (end − start)_c``).
* ``armijo_line_search``: the revised Armijo backtracking of I-GOS, every image with its own step.

Everything works on NCHW arrays internally; ``Perturbation`` transposes to and from the model's
layout at the model boundary.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np

from engine.errors import ParameterError
from engine.methods.common import output_scores
from engine.perturb import bilinear_matrix
from engine.protocol import ClassifierLike


def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D linear interpolation with ``align_corners=True`` (the one in
    ``engine.perturb``, which the metrics share), float64."""
    return bilinear_matrix(n_in, n_out, align_corners=True)


class Upsampler:
    """``up(M) = A_h · M · A_wᵀ`` for masks (N, h, w) -> (N, H, W); ``adjoint(G) = A_hᵀ · G · A_w``
    is its exact transpose, so ``⟨up(M), G⟩ = ⟨M, adjoint(G)⟩`` to rounding."""

    def __init__(self, mask_shape: tuple[int, int], image_shape: tuple[int, int]) -> None:
        self.mask_shape = tuple(int(s) for s in mask_shape)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.rows = align_corners_matrix(self.mask_shape[0], self.image_shape[0])
        self.cols = align_corners_matrix(self.mask_shape[1], self.image_shape[1])

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        return np.matmul(np.matmul(self.rows, masks), self.cols.T)

    def adjoint(self, grads: np.ndarray) -> np.ndarray:
        return np.matmul(np.matmul(self.rows.T, grads), self.cols)


def mask_shape(mask_size: int | Sequence[int], image_shape: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the mask: an int s gives s×s (as the references, whatever the image's aspect);
    a pair gives (h, w). Each side must be in [2, image side]."""
    if isinstance(mask_size, (int, np.integer)):
        shape = (int(mask_size), int(mask_size))
    else:
        try:
            shape = tuple(int(s) for s in mask_size)
        except (TypeError, ValueError):
            shape = ()
        if len(shape) != 2 or any(s != v for s, v in zip(shape, mask_size, strict=False)):
            raise ParameterError(f"mask_size must be an int or a pair of ints, got {mask_size!r}")
    if not all(2 <= s <= n for s, n in zip(shape, image_shape, strict=True)):
        raise ParameterError(
            f"mask_size must be between 2 and the image size {image_shape} on each side, got {mask_size!r}"
        )
    return shape


# -- regularisers ---------------------------------------------------------------------------------


def l1_term(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean|1 − M| per mask (N,), its gradient). The gradient at M = 1 is 0 (sign(0) = 0, as
    torch's ``abs``), which matters: every method starts from a mask of ones."""
    diff = 1.0 - masks
    size = masks[0].size
    return np.abs(diff).reshape(len(masks), -1).mean(axis=1), -np.sign(diff) / size


def _power_and_grad(d: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(d)
    if beta == 2.0:
        return a * a, 2.0 * d
    if beta == 1.0:
        return a, np.sign(d)
    return a**beta, beta * a ** (beta - 1.0) * np.sign(d)


def tv_term(
    masks: np.ndarray,
    beta: float,
    row_weights: np.ndarray | None = None,
    col_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(TV per mask (N,), its gradient): mean_w(|M[r+1,c] − M[r,c]|^β) + mean_w(|M[r,c+1] − M[r,c]|^β),
    each mean over its own (h−1)·w or h·(w−1) differences, optionally weighted per difference
    (``row_weights`` (N, h−1, w), ``col_weights`` (N, h, w−1); the bilateral TV)."""
    n = len(masks)
    total = np.zeros(n)
    grad = np.zeros_like(masks, dtype=np.float64)
    for axis, weights in ((1, row_weights), (2, col_weights)):
        d = np.diff(masks, axis=axis)
        value, dvalue = _power_and_grad(d, beta)
        if weights is not None:
            value, dvalue = weights * value, weights * dvalue
        count = d[0].size
        total += value.reshape(n, -1).sum(axis=1) / count
        dvalue = dvalue / count
        lead = [slice(None)] * 3
        lead[axis] = slice(1, None)
        trail = [slice(None)] * 3
        trail[axis] = slice(None, -1)
        grad[tuple(lead)] += dvalue
        grad[tuple(trail)] -= dvalue
    return total, grad


def regulariser(
    masks: np.ndarray, l1: np.ndarray | float, tv: float, tv_beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """(l1·mean|1 − M| + tv·TV_β(M) per mask (N,), its gradient). ``l1`` may differ per mask."""
    l1 = np.broadcast_to(np.asarray(l1, dtype=np.float64), (len(masks),))
    v1, g1 = l1_term(masks)
    v2, g2 = tv_term(masks, tv_beta)
    return l1 * v1 + tv * v2, l1[:, None, None] * g1 + tv * g2


def bilateral_weights(images: np.ndarray, shape: tuple[int, int], sigma: float) -> tuple[np.ndarray, ...]:
    """iGOS++'s bilateral TV weights at the mask's resolution: the images (N, C, H, W) sampled at the
    mask's grid (align_corners bilinear), then exp(−mean_c (Δx)² / σ) for each row and column
    neighbour pair: (N, h−1, w), (N, h, w−1). (IGOS_pp averages the channel differences before
    squaring for rows and squares first for columns; both use "square, then mean" here.)"""
    rows = align_corners_matrix(images.shape[2], shape[0])
    cols = align_corners_matrix(images.shape[3], shape[1])
    small = np.matmul(np.matmul(rows, images.astype(np.float64)), cols.T)  # (N, C, h, w)
    w_rows = np.exp(-(np.diff(small, axis=2) ** 2).mean(axis=1) / sigma)
    w_cols = np.exp(-(np.diff(small, axis=3) ** 2).mean(axis=1) / sigma)
    return w_rows, w_cols


# -- perturbed inputs and their scores --------------------------------------------------------------


class Perturbation:
    """Inputs ``start + α·up(M)·(end − start) + noise`` for a batch of N images (deletion:
    start = baseline, end = image; insertion: the reverse), explained ``target`` per image.

    ``noise_std`` (C,) per channel in the model's input units; channels with 0 get no noise. Image n
    draws its noise from its own generator (``np.random.SeedSequence(seed).spawn(N)[n]``, which
    depends on n only), so its result does not depend on the other images in the batch, only on
    the seed and its place; each call of ``noise`` draws
    ``standard_normal((points, noised channels, H, W))`` per image, in image order.
    """

    def __init__(
        self,
        model: ClassifierLike,
        start: np.ndarray,
        end: np.ndarray,
        target: np.ndarray,
        output: str,
        noise_std: np.ndarray,
        seed: int | None,
    ) -> None:
        self.model, self.target, self.output = model, target, output
        self.nhwc = model.layout == "NHWC"
        self.start = self._nchw(start).astype(np.float64)
        self.delta = self._nchw(end).astype(np.float64) - self.start
        self.noise_std = np.asarray(noise_std, dtype=np.float64)
        self.noised = np.flatnonzero(self.noise_std)
        seeds = np.random.SeedSequence(seed).spawn(len(target))
        self.rngs = [np.random.default_rng(s) for s in seeds]
        self.dtype = np.float32  # of the points handed to the model (tests use float64)

    def _nchw(self, a: np.ndarray) -> np.ndarray:
        return a.transpose(0, 3, 1, 2) if self.nhwc else a

    def _to_model(self, points: np.ndarray) -> np.ndarray:
        """(..., C, H, W) float32 -> rows in the model's layout."""
        rows = points.reshape(-1, *points.shape[-3:])
        return np.ascontiguousarray(rows.transpose(0, 2, 3, 1)) if self.nhwc else rows

    def noise(self, points: int, idx: np.ndarray) -> np.ndarray | None:
        """(points, len(idx), C, H, W) float64 noise for images ``idx``, or None without noise."""
        if self.noised.size == 0:
            return None
        c, h, w = self.start.shape[1:]
        out = np.zeros((points, len(idx), c, h, w))
        for j, n in enumerate(idx):
            draw = self.rngs[n].standard_normal((points, self.noised.size, h, w))
            out[:, j, self.noised] = draw * self.noise_std[self.noised][None, :, None, None]
        return out

    def points(self, up: np.ndarray, alphas: np.ndarray, idx: np.ndarray, noise) -> np.ndarray:
        """(P, k, C, H, W) float32 inputs for masks ``up`` (k, H, W) of images ``idx``."""
        start, delta = self.start[idx], self.delta[idx]
        pts = np.empty((len(alphas), *start.shape), dtype=self.dtype)
        for p, a in enumerate(alphas):
            v = start + (a * up)[:, None] * delta
            if noise is not None:
                v += noise[p]
            pts[p] = v
        return pts

    def scores(self, points: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Explained scores (P, k) of points (P, k, C, H, W), one ``predict`` call."""
        logits = self.model.predict(self._to_model(points))
        target = np.tile(self.target[idx], points.shape[0])
        return output_scores(logits, target, self.output).reshape(points.shape[:2])

    def gradients(self, points: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores (P, k) float64, input gradients (P, k, C, H, W) NCHW) of points (P, k, C, H, W):
        one ``gradient`` call for all P·k rows."""
        p, k = points.shape[:2]
        scores, grads = self.model.gradient(
            self._to_model(points), np.tile(self.target[idx], p), output=self.output
        )
        grads = np.asarray(grads)
        if self.nhwc:
            grads = grads.transpose(0, 3, 1, 2)
        return np.asarray(scores, dtype=np.float64).reshape(p, k), grads.reshape(p, k, *grads.shape[1:])

    def chain(
        self, grads: np.ndarray, alphas: np.ndarray, weights: np.ndarray, idx: np.ndarray
    ) -> np.ndarray:
        """d/d up(M) (k, H, W) of Σ_p w_p f(point_p), from the input gradients (P, k, C, H, W):
        Σ_p w_p α_p Σ_c ∂f/∂x_c ⊙ (end − start)_c."""
        delta = self.delta[idx]
        acc = np.zeros((len(idx), *delta.shape[2:]))
        for i in range(len(alphas)):
            if weights[i] != 0:
                acc += (weights[i] * alphas[i]) * np.einsum("nchw,nchw->nhw", grads[i], delta)
        return acc

    def score_and_grad(self, points: np.ndarray, alphas: np.ndarray, weights: np.ndarray, idx: np.ndarray):
        """(Σ_p w_p f(point_p) (k,), its gradient with respect to up(M) (k, H, W)), one ``gradient``
        call for all P·k points."""
        scores, grads = self.gradients(points, idx)
        return weights @ scores, self.chain(grads, alphas, weights, idx)


def check_noise(noise_std, noise_channels, channels: int) -> np.ndarray:
    """Per-channel noise std (C,) from ``noise_std`` (a number or one per channel) and
    ``noise_channels`` ("all" or channel indices)."""
    std = np.asarray(noise_std, dtype=np.float64)
    if std.ndim == 0:
        std = np.full(channels, float(std))
    if std.shape != (channels,) or not np.all(np.isfinite(std)) or np.any(std < 0):
        raise ParameterError(
            f"noise_std must be a number >= 0 or one per channel ({channels}), got {noise_std!r}"
        )
    if isinstance(noise_channels, str):
        if noise_channels != "all":
            raise ParameterError(f"noise_channels must be 'all' or channel indices, got {noise_channels!r}")
        return std
    ids = np.asarray(noise_channels).reshape(-1)
    if ids.dtype.kind not in "iu" or ids.size == 0 or ids.min() < 0 or ids.max() >= channels:
        raise ParameterError(
            f"noise_channels must be 'all' or indices in [0, {channels}), got {noise_channels!r}"
        )
    keep = np.zeros(channels)
    keep[ids] = 1.0
    return std * keep


# -- line search ------------------------------------------------------------------------------------


def armijo_line_search(
    objective: Callable[[np.ndarray, np.ndarray], np.ndarray],
    masks: np.ndarray,
    direction: np.ndarray,
    base: np.ndarray,
    *,
    step: float = 1000.0,
    decay: float = 0.2,
    floor: float = 1e-5,
    armijo: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The revised Armijo backtracking of I-GOS, per image.

    For each image: s = ``step``; while ``objective(clip(M − s·G, 0, 1)) > base − armijo·s·ΣG²``:
    s *= ``decay``, and once s < ``floor`` the search stops and takes that s untested (both
    reference codes do: the last step may be as small as floor·decay). All images still searching
    are evaluated together, one ``objective(candidates (k, h, w), image indices (k,))`` call per
    round. Returns (new masks clip(M − s·G, 0, 1), steps (N,), accepted (N,) bool: whether the
    Armijo condition held for the step taken).
    """
    n = len(masks)
    steps = np.full(n, float(step))
    sq = (direction * direction).reshape(n, -1).sum(axis=1)
    accepted = np.zeros(n, dtype=bool)
    active = np.arange(n)
    expand = (slice(None),) + (None,) * (masks.ndim - 1)  # one step per image, any mask shape
    while active.size:
        s = steps[active][expand]
        values = objective(np.clip(masks[active] - s * direction[active], 0.0, 1.0), active)
        ok = values <= base[active] - armijo * steps[active] * sq[active]
        accepted[active[ok]] = True
        failed = active[~ok]
        steps[failed] *= decay
        active = failed[steps[failed] >= floor]
    return np.clip(masks - steps[expand] * direction, 0.0, 1.0), steps, accepted


def check_line_search(step: float, decay: float, floor: float, armijo: float) -> None:
    for name, value in (("step", step), ("step_floor", floor)):
        if not (np.isfinite(value) and value > 0):
            raise ParameterError(f"{name} must be > 0, got {value!r}")
    if not (0 < decay < 1):
        raise ParameterError(f"step_decay must be in (0, 1), got {decay!r}")
    if not (np.isfinite(armijo) and armijo >= 0):
        raise ParameterError(f"armijo must be >= 0, got {armijo!r}")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ParameterError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_non_negative(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (np.isfinite(v) and v >= 0):
        raise ParameterError(f"{name} must be a number >= 0, got {value!r}")
    return v


def keyword_defaults(fn: Callable) -> dict:
    """The keyword-only parameters of ``fn`` and their defaults."""
    sig = inspect.signature(fn)
    return {k: v.default for k, v in sig.parameters.items() if v.kind is v.KEYWORD_ONLY}


def apply_preset(presets: dict[str, dict], preset: str | None, given: dict, defaults: dict) -> dict:
    """The parameters after ``preset``: its values replace those the caller left at their default."""
    if preset is None:
        return given
    if preset not in presets:
        raise ParameterError(f"preset must be one of {sorted(presets)} or None, got {preset!r}")
    out = dict(given)
    for key, value in presets[preset].items():
        if _same(given[key], defaults[key]):
            out[key] = value
    return out


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return False
    try:
        return bool(type(a) is type(b) and a == b)
    except (TypeError, ValueError):
        return False


# -- the set-up every mask method shares --------------------------------------------------------------


def setup(model: ClassifierLike, x: np.ndarray, target, output: str, p: dict) -> dict:
    """Validate the shared parameters in ``p`` and build what every mask method needs: x (float32),
    target (N,), the baseline batch, the mask shape, the Upsampler, the per-channel noise std, the
    channel axis. Keys of ``p`` used: baseline, blur_kernel, blur_sigma, median_kernel, seed,
    mask_size, iterations, l1, tv, tv_beta, noise_std, noise_channels."""
    from engine.methods.common import prepare
    from engine.perturb import mask_baseline, spatial_axes

    x, target = prepare(model, x, target, output)
    h_ax, w_ax = spatial_axes(model)
    image_shape = (x.shape[h_ax], x.shape[w_ax])
    ch_ax = 1 if model.layout == "NCHW" else 3
    shape = mask_shape(p["mask_size"], image_shape)
    out = {
        "x": x,
        "target": target,
        "shape": shape,
        "up": Upsampler(shape, image_shape),
        "ch_ax": ch_ax,
        "iterations": check_positive_int("iterations", p["iterations"], 0),
        "noise_std": check_noise(p["noise_std"], p["noise_channels"], x.shape[ch_ax]),
    }
    for key in ("l1", "tv", "tv_beta"):
        out[key] = check_non_negative(key, p[key])
    if out["tv_beta"] < 1:
        raise ParameterError(
            f"tv_beta must be >= 1 (the TV gradient is unbounded below 1), got {p['tv_beta']!r}"
        )
    out["baseline"] = mask_baseline(
        model,
        x,
        p["baseline"],
        blur_kernel=p["blur_kernel"],
        blur_sigma=p["blur_sigma"],
        median_kernel=p["median_kernel"],
        seed=p["seed"],
    )
    return out


def heatmap(up: Upsampler, masks: np.ndarray, x: np.ndarray, ch_ax: int) -> np.ndarray:
    """1 − up(M) as float32 shaped like ``x`` (repeated over the channel axis, as grad_cam)."""
    heat = 1.0 - up(masks)
    return np.broadcast_to(np.expand_dims(heat, ch_ax), x.shape).astype(np.float32)
