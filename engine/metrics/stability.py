"""Stability of an attribution method: how much its map moves when the input barely does.

Both metrics re-run the method (``method`` + ``method_params``) on perturbed copies of ``x``,
explaining the same class as on ``x``; docs/stability.md has the definitions.

* ``stability`` — −ln MSE between the map of an image and the map of its JPEG copy (quality 75,
  PIL, 4:2:0 chroma subsampling as PIL does at that quality), the maps first reduced to 2-D
  (Σ|channels|) and min-max scaled to [0, 1] (``normalise="min_max"``; ``"none"``: the raw maps).
  Higher is more stable; identical maps give +inf. The image goes to JPEG through ``input_range``:
  (x − low)/(high − low) → 8 bits → JPEG → back; x itself is not quantised.
* ``max_sensitivity`` — Yeh et al. 2019, Quantus' ``MaxSensitivity`` with Frobenius norms:
  max over ``samples`` of ‖Φ(x + δ) − Φ(x)‖ / ‖Φ(x)‖ with δ i.i.d. uniform in [−r, r],
  r = ``radius``·(high − low), x + δ clipped to the input range (``clip``). Quantus takes an
  absolute bound (0.2) and does not clip; the maps are not normalised (the ratio is already
  scale-free). Lower is more stable. Sample s draws its δ of x's shape from
  ``default_rng(seed)`` in order, so results do not depend on ``chunk``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from engine.errors import ParameterError
from engine.methods.common import check_input, resolve_target
from engine.metrics.base import MetricResult, metric
from engine.perturb import channel_first
from engine.postprocess import min_max


def _run(model, x, target, method, params, output) -> np.ndarray:
    from engine.methods import explain

    out = explain(model, x, method, target=target, output=output, **dict(params or {}))
    return np.asarray(out[0] if isinstance(out, tuple) else out, dtype=np.float64)


def _channel_axis(model) -> int:
    if model.layout == "NCHW":
        return 1
    if model.layout == "NHWC":
        return -1
    raise ParameterError(f"this metric needs an image model (layout NCHW or NHWC); got {model.layout!r}")


def jpeg_copy(model: Any, x: np.ndarray, quality: int = 75) -> np.ndarray:
    """Each image of ``x`` through an 8-bit JPEG at ``quality`` (PIL) and back to model space."""
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 95:
        raise ParameterError(f"quality must be an integer in [1, 95], got {quality!r}")
    axis = _channel_axis(model)
    lo, hi = (float(v) for v in model.input_range)
    hwc = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    if hwc.shape[-1] not in (1, 3):
        raise ParameterError(f"JPEG needs 1 or 3 channels, the images have {hwc.shape[-1]}")
    out = np.empty_like(hwc)
    for i, img in enumerate(hwc):
        u8 = np.round(np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
        pil = Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(quality))
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float64)
        out[i] = (back.reshape(img.shape) / 255.0) * (hi - lo) + lo
    return np.moveaxis(out, -1, axis).astype(np.float32)


def _normalised(maps: np.ndarray, axis: int, normalise: str) -> np.ndarray:
    if normalise == "none":
        return maps
    if normalise == "min_max":
        two_d = np.abs(maps).sum(axis=axis) if maps.ndim == 4 else maps
        return np.stack([min_max(m) for m in two_d])
    raise ParameterError(f"normalise must be 'min_max' or 'none', got {normalise!r}")


@metric(higher_is_better=True, needs="gradient", maps="input")
def stability(
    model: Any,
    x: np.ndarray,
    attributions: np.ndarray | None,
    target: Any = None,
    *,
    method: str = "saliency",
    method_params: Mapping[str, Any] | None = None,
    output: str = "probability",
    quality: int = 75,
    normalise: str = "min_max",
) -> list[MetricResult]:
    """−ln MSE(map(x), map(JPEG(x))) per image (see the module docstring). attributions: the
    method's maps on ``x`` if already computed (else computed here). One method run on the
    JPEG copies (and one on ``x`` without attributions). extra: "mse"."""
    x = check_input(model, x)
    target = resolve_target(model, x, target)
    axis = _channel_axis(model)
    base = (
        _run(model, x, target, method, method_params, output)
        if attributions is None
        else np.asarray(attributions, np.float64)
    )
    if base.shape != x.shape:
        raise ParameterError(f"attributions must be shaped like x {x.shape}, got {base.shape}")
    moved = _run(model, jpeg_copy(model, x, quality), target, method, method_params, output)
    a, b = _normalised(base, axis, normalise), _normalised(moved, axis, normalise)
    mse = ((a - b) ** 2).reshape(len(x), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        score = -np.log(mse)
    used = {
        "method": method,
        "method_params": dict(method_params or {}),
        "output": output,
        "quality": quality,
        "normalise": normalise,
    }
    return [
        MetricResult(
            metric="stability",
            score=float(score[i]),
            higher_is_better=True,
            target=int(target[i]),
            params=used,
            extra={"mse": float(mse[i])},
        )
        for i in range(len(x))
    ]


@metric(higher_is_better=False, needs="gradient", maps="input")
def max_sensitivity(
    model: Any,
    x: np.ndarray,
    attributions: np.ndarray | None,
    target: Any = None,
    *,
    method: str = "saliency",
    method_params: Mapping[str, Any] | None = None,
    output: str = "probability",
    radius: float = 0.05,
    samples: int = 10,
    seed: int = 0,
    chunk: int = 8,
    clip: bool = True,
) -> list[MetricResult]:
    """max_s ‖Φ(x + δ_s) − Φ(x)‖ / ‖Φ(x)‖ per image (Yeh et al. 2019; module docstring).
    radius: the noise bound in units of the input range width. samples: noisy copies per image,
    ``chunk`` of them (× all images) per method run, so memory stays flat as ``samples`` grows.
    clip: clip x + δ to ``input_range`` (Quantus does not). A zero map of x gives inf (or 0 if
    every noisy map is zero too). extra: "ratios" per sample."""
    for name, value in (("samples", samples), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ParameterError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(radius, (int, float, np.floating)) and np.isfinite(radius) and radius > 0):
        raise ParameterError(f"radius must be a positive number, got {radius!r}")
    x = check_input(model, x)
    target = resolve_target(model, x, target)
    base = (
        _run(model, x, target, method, method_params, output)
        if attributions is None
        else np.asarray(attributions, np.float64)
    )
    if base.shape != x.shape:
        raise ParameterError(f"attributions must be shaped like x {x.shape}, got {base.shape}")
    lo, hi = (float(v) for v in model.input_range)
    r = float(radius) * (hi - lo)
    rng = np.random.default_rng(seed)
    n = len(x)
    norm = np.sqrt((base.reshape(n, -1) ** 2).sum(axis=1))
    ratios = np.empty((samples, n))
    for start in range(0, samples, chunk):
        count = min(chunk, samples - start)
        noisy = np.empty((count, *x.shape), np.float32)
        for s in range(count):
            noisy[s] = x + channel_first(lambda shape: rng.uniform(-r, r, size=shape), x.shape, model.layout)
        if clip:  # the model's valid inputs (explain warns about values outside them)
            np.clip(noisy, lo, hi, out=noisy)
        maps = _run(
            model,
            noisy.reshape(count * n, *x.shape[1:]),
            np.tile(target, count),
            method,
            method_params,
            output,
        ).reshape(count, n, -1)
        diff = np.sqrt(((maps - base.reshape(1, n, -1)) ** 2).sum(axis=2))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios[start : start + count] = np.where(diff == 0, 0.0, diff / norm)
    score = ratios.max(axis=0)
    used = {
        "method": method,
        "method_params": dict(method_params or {}),
        "output": output,
        "radius": radius,
        "samples": samples,
        "seed": seed,
        "chunk": chunk,
        "clip": clip,
    }
    return [
        MetricResult(
            metric="max_sensitivity",
            score=float(score[i]),
            higher_is_better=False,
            target=int(target[i]),
            params=used,
            extra={"ratios": ratios[:, i].tolist()},
        )
        for i in range(n)
    ]


__all__ = ["jpeg_copy", "max_sensitivity", "stability"]
