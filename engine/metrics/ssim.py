"""SSIM and multi-scale SSIM in numpy/scipy, computed the way ``pytorch_msssim`` 1.0 does.

Used by the MS-SSIM variant of the performance information curves (specs/metrics.md §6e), whose
reproduction takes ``pytorch_msssim.ms_ssim(bokeh, original, data_range=1)`` as the x axis.
Definition (Wang, Simoncelli & Bovik 2003), with that library's conventions:

* a normalised 1-D Gaussian window (``win_size`` 11, ``win_sigma`` 1.5) applied separably and
  "valid" (no padding: the maps shrink by ``win_size - 1``); an axis shorter than the window is
  not smoothed (as the library does, with a warning there);
* ``C1 = (K1 · data_range)²``, ``C2 = (K2 · data_range)²``, K = (0.01, 0.03);
* per channel, SSIM = mean of the SSIM map and cs = mean of the contrast-structure map;
* MS-SSIM over 5 scales with weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333): between scales a
  2×2 average pool, zero-padded by one on each side of an odd-sized axis with the padding counted
  in the average (torch ``avg_pool2d(padding=size % 2)``); ``relu`` on every cs and on the last
  SSIM; the product of the powered terms, then the mean over channels.

Shapes: images (N, C, H, W), channels first; results (N,). Computed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from engine.errors import InputError

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """The normalised 1-D Gaussian window (``size`` taps, centred), built in float32 as the
    reference library builds it (then used in float64), so the two agree to float64 rounding."""
    coords = np.arange(size, dtype=np.float32) - np.float32(size // 2)
    # exp in float64 rounded to float32: the correctly rounded float32 value torch's exp gives
    g = np.exp((-(coords**2) / np.float32(2 * sigma**2)).astype(np.float64)).astype(np.float32)
    # the float32 sum torch returns here equals the float64 sum rounded once (not a float32 loop)
    return (g / np.float32(g.astype(np.float64).sum())).astype(np.float64)


def _filter(x: np.ndarray, win: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation over the last two axes (skipping an axis shorter than win)."""
    r = len(win) // 2
    for axis in (-2, -1):
        if x.shape[axis] >= len(win):
            x = ndimage.correlate1d(x, win, axis=axis, mode="constant")
            sl = [slice(None)] * x.ndim
            sl[axis] = slice(r, x.shape[axis] - r)
            x = x[tuple(sl)]
    return x


def _ssim_cs(x, y, win, data_range, k):
    c1 = (k[0] * data_range) ** 2
    c2 = (k[1] * data_range) ** 2
    mu1, mu2 = _filter(x, win), _filter(y, win)
    s11 = _filter(x * x, win) - mu1 * mu1
    s22 = _filter(y * y, win) - mu2 * mu2
    s12 = _filter(x * y, win) - mu1 * mu2
    cs_map = (2 * s12 + c2) / (s11 + s22 + c2)
    ssim_map = ((2 * mu1 * mu2 + c1) / (mu1 * mu1 + mu2 * mu2 + c1)) * cs_map
    return ssim_map.mean(axis=(-2, -1)), cs_map.mean(axis=(-2, -1))  # (N, C) each


def _check(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 4:
        raise InputError(f"ssim needs two (N, C, H, W) arrays of one shape; got {x.shape} and {y.shape}")
    return x, y


def ssim(
    x: np.ndarray,
    y: np.ndarray,
    *,
    data_range: float = 1.0,
    win_size: int = 11,
    win_sigma: float = 1.5,
    k: tuple[float, float] = (0.01, 0.03),
) -> np.ndarray:
    """Single-scale SSIM per image (N,): the mean over channels of each channel's mean SSIM."""
    x, y = _check(x, y)
    if win_size % 2 != 1:
        raise InputError(f"win_size must be odd, got {win_size}")
    s, _ = _ssim_cs(x, y, gaussian_window(win_size, win_sigma), data_range, k)
    return s.mean(axis=1)


def _avg_pool2(x: np.ndarray) -> np.ndarray:
    """torch ``avg_pool2d(kernel_size=2, padding=size % 2)``: zero padding counted in the mean."""
    ph, pw = x.shape[-2] % 2, x.shape[-1] % 2
    if ph or pw:
        x = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(ph, ph), (pw, pw)])
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    x = x[..., : 2 * h, : 2 * w]
    return x.reshape(*x.shape[:-2], h, 2, w, 2).mean(axis=(-3, -1))


def ms_ssim(
    x: np.ndarray,
    y: np.ndarray,
    *,
    data_range: float = 1.0,
    win_size: int = 11,
    win_sigma: float = 1.5,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
    k: tuple[float, float] = (0.01, 0.03),
) -> np.ndarray:
    """Multi-scale SSIM per image (N,) of two (N, C, H, W) batches (module docstring).

    The smaller side must exceed ``(win_size - 1) · 2**(len(weights) - 1)`` (160 px by default),
    as the reference library asserts.
    """
    x, y = _check(x, y)
    if win_size % 2 != 1:
        raise InputError(f"win_size must be odd, got {win_size}")
    levels = len(weights)
    need = (win_size - 1) * 2 ** (levels - 1)
    if min(x.shape[-2:]) <= need:
        raise InputError(f"ms_ssim needs images larger than {need} px on each side; got {x.shape[-2:]}")
    win = gaussian_window(win_size, win_sigma)
    terms = []
    for i in range(levels):
        s, cs = _ssim_cs(x, y, win, data_range, k)
        if i < levels - 1:
            terms.append(np.maximum(cs, 0.0))
            x, y = _avg_pool2(x), _avg_pool2(y)
    terms.append(np.maximum(s, 0.0))
    w = np.asarray(weights, np.float64).reshape(-1, 1, 1)
    return np.prod(np.stack(terms) ** w, axis=0).mean(axis=1)


__all__ = ["ssim", "ms_ssim", "gaussian_window", "MS_SSIM_WEIGHTS"]
