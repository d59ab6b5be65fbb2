"""Heatmap post-processing: attribution maps to 2-D pictures in [0, 1], each reference's way.

Shared by the metrics (the sanity checks compare normalised maps) and the reports
(``engine.report.heatmap``). Definitions in docs/postprocessing.md (specs/metrics.md §8):

* ``pair_grayscale`` — PAIR saliency ``VisualizeImageGrayscale``: Σ|channels|, scaled from its
  minimum to its 99th percentile, clipped to [0, 1];
* ``pair_diverging`` — PAIR ``VisualizeImageDiverging``: Σ channels over ± |99th percentile|,
  clipped to [−1, 1] as PAIR codes it (so the result lies in [0, 1] for the values it maps);
* ``agi_clip`` — AGI's ``plot_hm``: the channel mean clipped to its 80th..99th percentiles, scaled;
* ``igos_invert`` — I-GOS's ``save_heatmap``: 1 − min-max(mask) (a deletion mask is small where
  it matters);
* ``min_max`` — (h − min)/(max − min).

Each works on one example; ``channel_axis`` says where its channels are (−1: HWC as PAIR and AGI
take them; 0 for CHW). Where the reference divides by zero (a constant map: NaN there), these
return zeros (``pair_diverging``: 0.5, the picture of a zero map).
"""

from __future__ import annotations

import numpy as np

from engine.errors import ParameterError


def _check_percentile(name: str, value: float) -> float:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and 0 <= value <= 100):
        raise ParameterError(f"{name} must be a number in [0, 100], got {value!r}")
    return float(value)


def _three_d(m: np.ndarray, channel_axis: int) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 3:
        raise ParameterError(f"the map must have 3 axes (one example with channels), got shape {m.shape}")
    if channel_axis not in (-1, 0, 2):
        raise ParameterError(f"channel_axis must be 0 or -1, got {channel_axis!r}")
    return np.moveaxis(m, channel_axis, -1)


def min_max(h: np.ndarray) -> np.ndarray:
    """(h − min)/(max − min) in float64; zeros for a constant map."""
    h = np.asarray(h, dtype=np.float64)
    lo, hi = float(h.min()), float(h.max())
    return np.zeros_like(h) if hi <= lo else (h - lo) / (hi - lo)


def pair_grayscale(m: np.ndarray, percentile: float = 99, channel_axis: int = -1) -> np.ndarray:
    """PAIR ``VisualizeImageGrayscale``: s = Σ_c |m|; clip((s − min s)/(P_percentile(s) − min s),
    0, 1) with numpy's linear-interpolation percentile. (H, W) float64."""
    percentile = _check_percentile("percentile", percentile)
    s = np.abs(_three_d(m, channel_axis)).sum(axis=-1)
    vmax, vmin = np.percentile(s, percentile), s.min()
    if vmax <= vmin:
        return np.zeros_like(s)
    return np.clip((s - vmin) / (vmax - vmin), 0, 1)


def pair_diverging(m: np.ndarray, percentile: float = 99, channel_axis: int = -1) -> np.ndarray:
    """PAIR ``VisualizeImageDiverging``: s = Σ_c m; span = |P_percentile(s)|;
    clip((s + span)/(2 span), −1, 1) — the lower bound −1 as PAIR codes it. (H, W) float64."""
    percentile = _check_percentile("percentile", percentile)
    s = _three_d(m, channel_axis).sum(axis=-1)
    span = abs(float(np.percentile(s, percentile)))
    if span == 0:
        return np.full_like(s, 0.5)
    return np.clip((s + span) / (2 * span), -1, 1)


def agi_clip(m: np.ndarray, low: float = 80, high: float = 99, channel_axis: int = -1) -> np.ndarray:
    """AGI ``plot_hm``: h = mean over channels of the signed map; q, u = its ``low``-th and
    ``high``-th percentiles; (clip(h, q, u) − q)/(u − q). A 2-D map is taken as it is. (H, W)."""
    low, high = _check_percentile("low", low), _check_percentile("high", high)
    if low >= high:
        raise ParameterError(f"low must be below high, got low={low}, high={high}")
    m = np.asarray(m, dtype=np.float64)
    h = m if m.ndim == 2 else _three_d(m, channel_axis).mean(axis=-1)
    q, u = np.percentile(h, low), np.percentile(h, high)
    if u <= q:
        return np.zeros_like(h)
    return (np.clip(h, q, u) - q) / (u - q)


def igos_invert(mask: np.ndarray) -> np.ndarray:
    """I-GOS ``save_heatmap``: 1 − (M − min)/(max − min) of a deletion mask (small = important),
    so that important regions are bright. (Its optional 11×11 Gaussian blur is not applied.)"""
    mask = np.asarray(mask, dtype=np.float64)
    lo, hi = float(mask.min()), float(mask.max())
    return np.zeros_like(mask) if hi <= lo else 1.0 - (mask - lo) / (hi - lo)


def reduce_channels(m: np.ndarray, rule: str = "abs_sum", channel_axis: int = -1) -> np.ndarray:
    """One example's map to 2-D: "sum", "abs_sum" (Σ|·|), "mean", "max_abs" over channels; a 2-D
    map is returned as it is (float64)."""
    m = np.asarray(m, dtype=np.float64)
    if m.ndim == 2:
        return m
    m = _three_d(m, channel_axis)
    if rule == "sum":
        return m.sum(axis=-1)
    if rule == "abs_sum":
        return np.abs(m).sum(axis=-1)
    if rule == "mean":
        return m.mean(axis=-1)
    if rule == "max_abs":
        return np.abs(m).max(axis=-1)
    raise ParameterError(f"rule must be 'sum', 'abs_sum', 'mean' or 'max_abs', got {rule!r}")


__all__ = ["agi_clip", "igos_invert", "min_max", "pair_diverging", "pair_grayscale", "reduce_channels"]
