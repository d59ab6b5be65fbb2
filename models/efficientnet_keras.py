"""The pretrained EfficientNet-Lite0 ported from PyTorch to Keras 3 (channels-last), same weights.

The network is written from ``efficientnet_lite_pytorch`` (``EfficientNet.from_name(
"efficientnet-lite0")``): a 3x3/2 stem conv, 16 MBConv blocks (optional 1x1 expand, kxk
depthwise, 1x1 project, each followed by BatchNorm; ReLU6 after expand and depthwise; identity
skip when the stride is 1 and the widths match), a 1x1 head conv to 1280, global average pool
and a 1000-way dense layer. The weights are copied from the torch module: conv kernels OIHW ->
HWIO, depthwise (C, 1, k, k) -> (k, k, C, 1), the dense kernel transposed, BatchNorm
gamma/beta/running mean/running variance as they are.

Padding: every conv of the torch model is a ``Conv2dStaticSamePadding``, i.e. TensorFlow's
"same" padding computed once for a 224x224 input and applied as an explicit ``ZeroPad2d``,
asymmetric (one more row/column at the bottom/right) for stride 2 at even sizes. The port does
the same with ``ZeroPadding2D`` followed by a "valid" conv, and checks each pad against the
torch module's while copying weights.

The porting mistake: ``efficientnet_lite_pytorch`` builds its BatchNorms with
``eps=1e-3`` (the TensorFlow value, which is also Keras' default), not PyTorch's default 1e-5.
``bn_epsilon=None`` uses the torch module's own epsilon (the exact port); any other value,
typically 1e-5 (a porter who assumes PyTorch's default), is the classic mistake that
``onnxplain compare`` must show.

Importing this module imports TensorFlow (several seconds).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import keras
import numpy as np
from torch import nn

from engine.errors import InputError, ParameterError
from exporters._common import ExportReport
from models import efficientnet

INPUT_SHAPE_NHWC = (224, 224, 3)
MISTAKE_BN_EPSILON = 1e-5  # PyTorch's BatchNorm2d default, wrong for this model (it uses 1e-3)
_STEM_FILTERS = 32
_HEAD_FILTERS = 1280


class _Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


# efficientnet_lite_pytorch.utils.efficientnet_lite's block strings ('r1_k3_s11_e1_i32_o16', ...).
# Lite0 has width and depth coefficient 1.0 and fixes the stem and head, so no rounding applies.
_STAGES = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)


def _blocks() -> list[_Stage]:
    """One entry per MBConv block: the first of a stage has its stride and input width, the
    repeats stride 1 and the stage's output width (as ``EfficientNet.__init__`` expands them)."""
    blocks = []
    for stage in _STAGES:
        blocks.append(stage._replace(repeats=1))
        blocks += [stage._replace(repeats=1, stride=1, filters_in=stage.filters_out)] * (stage.repeats - 1)
    return blocks


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """``Conv2dStaticSamePadding``'s pad (before, after) for one spatial axis: TensorFlow "same",
    output ``ceil(size / stride)``, the odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _padded(x, size: int, kernel: int, stride: int, name: str):
    pad = _same_padding(size, kernel, stride)
    if pad == (0, 0):
        return x
    return keras.layers.ZeroPadding2D((pad, pad), name=f"{name}_pad")(x)


def _check_epsilon(bn_epsilon: float | None) -> None:
    if bn_epsilon is None:
        return
    if isinstance(bn_epsilon, bool) or not isinstance(bn_epsilon, (int, float)):
        raise ParameterError(f"bn_epsilon must be a positive number or None, got {bn_epsilon!r}")
    if not (math.isfinite(bn_epsilon) and bn_epsilon > 0):
        raise ParameterError(f"bn_epsilon must be a positive finite number or None, got {bn_epsilon!r}")


def _torch_epsilon(torch_module: nn.Module) -> float:
    values = {m.eps for m in torch_module.modules() if isinstance(m, nn.BatchNorm2d)}
    if len(values) != 1:
        raise InputError(f"torch_module: expected one BatchNorm epsilon throughout, found {sorted(values)}")
    return float(values.pop())


def _architecture(bn_epsilon: float) -> keras.Model:
    """The Keras network with fresh weights; layer names follow the torch module's
    (``stem_conv`` <-> ``_conv_stem``, ``block3_depthwise`` <-> ``_blocks.3._depthwise_conv``)."""

    def bn(x, name):
        return keras.layers.BatchNormalization(epsilon=bn_epsilon, name=name)(x)

    def relu6(x, name):
        return keras.layers.ReLU(max_value=6.0, name=name)(x)

    size = INPUT_SHAPE_NHWC[0]
    inputs = keras.Input(INPUT_SHAPE_NHWC, name="image")
    x = _padded(inputs, size, 3, 2, "stem_conv")
    x = keras.layers.Conv2D(_STEM_FILTERS, 3, strides=2, use_bias=False, name="stem_conv")(x)
    x = relu6(bn(x, "stem_bn"), "stem_relu6")
    size = math.ceil(size / 2)

    for i, block in enumerate(_blocks()):
        name = f"block{i}"
        block_input = x
        width = block.filters_in * block.expand
        if block.expand != 1:
            x = keras.layers.Conv2D(width, 1, use_bias=False, name=f"{name}_expand")(x)
            x = relu6(bn(x, f"{name}_expand_bn"), f"{name}_expand_relu6")
        x = _padded(x, size, block.kernel, block.stride, f"{name}_depthwise")
        x = keras.layers.DepthwiseConv2D(
            block.kernel, strides=block.stride, use_bias=False, name=f"{name}_depthwise"
        )(x)
        x = relu6(bn(x, f"{name}_depthwise_bn"), f"{name}_depthwise_relu6")
        size = math.ceil(size / block.stride)
        x = keras.layers.Conv2D(block.filters_out, 1, use_bias=False, name=f"{name}_project")(x)
        x = bn(x, f"{name}_project_bn")  # no activation after the projection (linear bottleneck)
        if block.stride == 1 and block.filters_in == block.filters_out:
            # drop_connect is identity in eval mode, so the skip is a plain sum.
            x = keras.layers.Add(name=f"{name}_add")([x, block_input])

    x = keras.layers.Conv2D(_HEAD_FILTERS, 1, use_bias=False, name="head_conv")(x)
    x = relu6(bn(x, "head_bn"), "head_relu6")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)  # dropout: identity in eval mode
    logits = keras.layers.Dense(efficientnet.NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, logits, name="efficientnet_lite0")


def build_keras_efficientnet_lite0(
    torch_module: nn.Module | None = None, *, bn_epsilon: float | None = None
) -> keras.Model:
    """EfficientNet-Lite0 as a Keras 3 functional model with the torch module's weights.

    Args:
        torch_module: an ``efficientnet_lite_pytorch`` EfficientNet-Lite0; default the pretrained
            one from :func:`models.efficientnet.load_efficientnet_lite0`.
        bn_epsilon: BatchNormalization epsilon; ``None`` is the torch module's own (1e-3 for
            the pretrained model): the exact port. Any other value (e.g.
            :data:`MISTAKE_BN_EPSILON`, PyTorch's default) makes the porting mistake.

    Returns a model mapping (N, 224, 224, 3) images normalised as the torch model expects
    (``(x - 0.5) / 0.5``, i.e. in [-1, 1]) to (N, 1000) logits:
    ``keras(x.transpose(0, 2, 3, 1)) == torch(x)`` to float rounding when ``bn_epsilon`` is None.
    Raises :class:`engine.errors.InputError` when ``torch_module`` is not that network.
    """
    _check_epsilon(bn_epsilon)
    if torch_module is None:
        torch_module = efficientnet.load_efficientnet_lite0()
    epsilon = _torch_epsilon(torch_module) if bn_epsilon is None else float(bn_epsilon)
    model = _architecture(epsilon)
    _copy_weights(torch_module, model)
    return model


def _copy_weights(torch_module: nn.Module, model: keras.Model) -> None:
    """Copy every parameter and BatchNorm statistic of ``torch_module`` into ``model``; refuse a
    module whose layers, shapes or paddings differ from the port's."""
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in torch_module.state_dict().items()}
    modules = dict(torch_module.named_modules())
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise InputError(f"torch_module has no {key!r}: not an efficientnet_lite_pytorch Lite0")
        used.add(key)
        return state[key]

    def assign(layer_name: str, values: list[np.ndarray]) -> None:
        layer = model.get_layer(layer_name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if [v.shape for v in values] != expected:
            raise InputError(
                f"torch_module: shapes {[v.shape for v in values]} do not fit Keras layer "
                f"{layer_name!r} {expected}"
            )
        layer.set_weights(values)

    def conv(torch_name: str, layer_name: str) -> None:
        weight = take(f"{torch_name}.weight")
        if isinstance(model.get_layer(layer_name), keras.layers.DepthwiseConv2D):
            kernel = weight.transpose(2, 3, 0, 1)  # (C, 1, k, k) -> (k, k, C, 1)
        else:
            kernel = weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        assign(layer_name, [kernel])
        _check_padding(modules[torch_name], model, layer_name)

    def batchnorm(torch_name: str, layer_name: str) -> None:
        params = [take(f"{torch_name}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
        used.add(f"{torch_name}.num_batches_tracked")  # training-only counter
        assign(layer_name, params)

    conv("_conv_stem", "stem_conv")
    batchnorm("_bn0", "stem_bn")
    for i, block in enumerate(_blocks()):
        prefix, name = f"_blocks.{i}", f"block{i}"
        if block.expand != 1:
            conv(f"{prefix}._expand_conv", f"{name}_expand")
            batchnorm(f"{prefix}._bn0", f"{name}_expand_bn")
        conv(f"{prefix}._depthwise_conv", f"{name}_depthwise")
        batchnorm(f"{prefix}._bn1", f"{name}_depthwise_bn")
        conv(f"{prefix}._project_conv", f"{name}_project")
        batchnorm(f"{prefix}._bn2", f"{name}_project_bn")
    conv("_conv_head", "head_conv")
    batchnorm("_bn1", "head_bn")
    assign("logits", [take("_fc.weight").T, take("_fc.bias")])  # (out, in) -> (in, out)

    left = sorted(set(state) - used)
    if left:
        raise InputError(f"torch_module has tensors the port does not use: {left[:5]}")


def _check_padding(torch_conv: nn.Module, model: keras.Model, layer_name: str) -> None:
    pad = getattr(torch_conv, "static_padding", None)
    torch_pad = tuple(pad.padding) if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)  # (l, r, t, b)
    try:
        (top, bottom), (left, right) = model.get_layer(f"{layer_name}_pad").padding
        keras_pad = (left, right, top, bottom)
    except ValueError:  # no padding layer
        keras_pad = (0, 0, 0, 0)
    if torch_pad != keras_pad:
        raise InputError(
            f"torch_module: {layer_name} pads (left, right, top, bottom) {torch_pad}, the port {keras_pad}"
        )


def export_keras_efficientnet_lite0(
    path: str | os.PathLike,
    *,
    bn_epsilon: float | None = None,
    torch_module: nn.Module | None = None,
    **kwargs,
) -> ExportReport:
    """Export the Keras port to ``path`` through :func:`exporters.keras.export` with the same
    normalisation (mean = std = 0.5) and labels as
    :func:`models.efficientnet.export_efficientnet_lite0`, so the two files are the same task:
    the ONNX input is a [0, 1] RGB image batch, here channels-last (N, 224, 224, 3).
    ``bn_epsilon`` and ``torch_module`` as in :func:`build_keras_efficientnet_lite0`;
    ``kwargs`` go to the exporter (e.g. ``opset``, ``rtol``)."""
    from exporters.keras import export

    model = build_keras_efficientnet_lite0(torch_module, bn_epsilon=bn_epsilon)
    return export(
        model,
        path,
        mean=efficientnet.MEAN,
        std=efficientnet.STD,
        labels=efficientnet.imagenet_labels(),
        **kwargs,
    )
