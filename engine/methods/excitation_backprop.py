"""Excitation backprop (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016
and IJCV 2018): marginal winning probabilities (MWP) and their contrastive form (c-MWP).

The rule lives in a graph of its own (``engine.compile.excitation``, docs/excitation-backprop.md):
the probability P(target logit) = 1 is passed down through the positive weights of every linear
layer, normalised by the forward z+ = W+ a, so that P at a layer is its activation times the
gradient of that graph. One runtime call per chunk of images.
"""

from __future__ import annotations

import numpy as np

from engine.errors import InputError, ParameterError
from engine.methods.common import Target, prepare
from engine.methods.grad_cam import upsample_bilinear
from engine.perturb import spatial_axes
from engine.protocol import ClassifierLike


def excitation_backprop(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
    contrastive: bool = True,
    layer: str | None = None,
    layer_layout: str | None = None,
) -> np.ndarray:
    """Excitation backprop map: P at ``layer`` summed over channels, upsampled bilinearly
    (align_corners=False, as Grad-CAM here) to the input's spatial size, shaped like ``x``.

    contrastive=True (c-MWP, the paper's discriminative map and the I-GOS baseline): P of the
    target minus P of its "dual" unit (the classifier weights negated), clamped at 0 after the
    channel sum. The paper subtracts at an intermediate "contrast layer"; below the classifier the
    recursion is linear in P for fixed activations, so the difference is the same wherever it is
    taken, and it is taken at the top (one pass). contrastive=False: plain MWP (non-negative).
    layer: None (the last convolutional feature map, the tensor Grad-CAM uses by default), "input"
    (P of every input value; where the first linear layer sees a negative value, e.g. a
    mean-subtracted pixel darker than the mean, P is 0: MWP needs non-negative activations), or
    a tensor name of the ONNX graph. The paper computes its maps at intermediate layers (pool3 or
    so): name that tensor. layer_layout: how the 4-D ``layer`` tensor is laid out (None: "NCHW",
    as ONNX holds Conv activations, also in an NHWC model's graph).
    output: accepted for the common signature and ignored: the top-down signal starts at the
    target's logit unit whatever the explained output.
    """
    if not isinstance(contrastive, (bool, np.bool_)):
        raise ParameterError(f"contrastive must be True or False, got {contrastive!r}")
    if layer is not None and (not isinstance(layer, str) or not layer):
        raise ParameterError(f"layer must be None, 'input' or a tensor name, got {layer!r}")
    if layer_layout not in (None, "NCHW", "NHWC"):
        raise ParameterError(f"layer_layout must be None, 'NCHW' or 'NHWC', got {layer_layout!r}")
    if not hasattr(model, "excitation"):
        raise InputError(
            "excitation_backprop needs an ONNX Classifier (engine.load): its rule is compiled into "
            f"a graph of its own; {type(model).__name__} has no excitation()"
        )
    x, target = prepare(model, x, target, output)
    _, act, grad = model.excitation(x, target, layer=layer, contrastive=bool(contrastive))
    p = np.asarray(act, np.float64) * np.asarray(grad, np.float64)
    image = model.layout in ("NCHW", "NHWC")
    if layer == "input":
        if not image:
            return (np.maximum(p, 0.0) if contrastive else p).astype(np.float32)
        ch_ax = 1 if model.layout == "NCHW" else 3
        m = p.sum(axis=ch_ax, keepdims=True)
        m = np.maximum(m, 0.0) if contrastive else m
        return np.broadcast_to(m, x.shape).astype(np.float32)
    if p.ndim != 4 or not image:
        raise InputError(
            f"excitation_backprop at layer {layer!r}: a 4-D feature map of an image model is needed, "
            f"got an activation of shape {p.shape}; use layer='input'"
        )
    layout = layer_layout or "NCHW"
    m = p.sum(axis=1 if layout == "NCHW" else 3)
    if contrastive:
        m = np.maximum(m, 0.0)
    h_ax, w_ax = spatial_axes(model)
    m = upsample_bilinear(m, (x.shape[h_ax], x.shape[w_ax]))
    ch_ax = 1 if model.layout == "NCHW" else 3
    return np.broadcast_to(np.expand_dims(m, ch_ax), x.shape).astype(np.float32)
