"""Grad-CAM (Selvaraju et al., ICCV 2017), upsampled like captum ``LayerGradCam`` +
``LayerAttribution.interpolate(..., "bilinear")``."""

from __future__ import annotations

import numpy as np

from engine import perturb
from engine.methods.common import Target, prepare
from engine.perturb import spatial_axes
from engine.protocol import ClassifierLike


def upsample_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (N, h, w) maps to (N, H, W), like ``F.interpolate(mode="bilinear",
    align_corners=False)`` (torch's default, which captum uses)."""
    return perturb.upsample_bilinear(maps, size, align_corners=False)


def grad_cam(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
    layer: str | None = None,
    relu: bool = True,
    layer_layout: str | None = None,
) -> np.ndarray:
    """Grad-CAM: ReLU(Σ_k w_k A_k) with w_k the spatial mean of ∂f_c/∂A_k, upsampled bilinearly
    (align_corners=False) to the input's spatial size.

    layer: a named tensor, or None for the last convolutional feature map (chosen by the model).
    The activation A is read as ``layer_layout`` (None: ``model.layout``): (N, C', h, w) for
    "NCHW", (N, h, w, C') for "NHWC" — pass "NCHW" for a channels-first tensor of an NHWC model.
    relu=True as the paper (captum's ``relu_attributions`` defaults to False); the ReLU is applied
    at the layer's resolution, before upsampling, as captum. No max-normalisation (PAIR divides
    by the max). The paper explains the pre-softmax score: pass output="logit" for that.
    The map is returned broadcast over the channel axis, so the result is shaped like ``x``
    (N, *input_shape) — every channel carries the same values.
    """
    x, target = prepare(model, x, target, output)
    h_ax, w_ax = spatial_axes(model)
    _, act, grad = model.layer_gradient(x, target, output=output, layer=layer)
    act, grad = np.asarray(act, dtype=np.float64), np.asarray(grad, dtype=np.float64)
    if act.ndim != 4 or act.shape != grad.shape or act.shape[0] != x.shape[0]:
        raise ValueError(
            f"Grad-CAM needs a 4-D feature map and its gradient; got {act.shape} and {grad.shape}"
        )
    layer_layout = layer_layout or model.layout
    if layer_layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layer_layout must be 'NCHW' or 'NHWC', got {layer_layout!r}")
    if layer_layout == "NHWC":
        act, grad = act.transpose(0, 3, 1, 2), grad.transpose(0, 3, 1, 2)
    weights = grad.mean(axis=(2, 3), keepdims=True)
    cam = (weights * act).sum(axis=1)  # (N, h, w)
    if relu:
        cam = np.maximum(cam, 0.0)
    cam = upsample_bilinear(cam, (x.shape[h_ax], x.shape[w_ax]))
    ch_ax = 1 if model.layout == "NCHW" else 3
    return np.broadcast_to(np.expand_dims(cam, ch_ax), x.shape).astype(np.float32)
