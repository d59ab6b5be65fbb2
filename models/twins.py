"""One small CNN built twice: PyTorch (NCHW) and Keras 3 (NHWC) with identical weights.

The twins let tests prove that an explanation does not depend on the framework a model came
from: both exports must give the same logits (and gradients) after a layout transpose.

Architecture (input 3x32x32): conv3x3(8) - BN - ReLU - maxpool2 - conv3x3(16) - BN - ReLU -
avgpool2 - flatten - dense(10). The flatten is kept on purpose: PyTorch flattens (C, H, W),
Keras (H, W, C), so the dense kernel must be permuted, as in any real port.

Importing this module imports TensorFlow (several seconds).
"""

from __future__ import annotations

from typing import Literal

import keras
import numpy as np
import torch
from torch import nn

from models.zoo import randomize_batchnorm, seeded

INPUT_SHAPE_NCHW = (3, 32, 32)
INPUT_SHAPE_NHWC = (32, 32, 3)
NUM_CLASSES = 10
BN_EPSILON = 1e-5  # PyTorch's default; Keras defaults to 1e-3, so it is set on both sides
_FEATURES = (16, 8, 8)  # (C, H, W) before the flatten

KerasStyle = Literal["functional", "sequential", "subclassed"]


def build_torch_twin(seed: int = 0) -> nn.Module:
    """The PyTorch twin in eval mode; BatchNorm statistics and affine parameters are random."""
    with seeded(seed):
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8, eps=BN_EPSILON),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16, eps=BN_EPSILON),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(int(np.prod(_FEATURES)), NUM_CLASSES),
        )
        randomize_batchnorm(net)
        return net.eval()


def _keras_layers(bn_epsilon: float = BN_EPSILON) -> list[keras.layers.Layer]:
    # padding="same" equals PyTorch's padding=1 for a 3x3 kernel at stride 1.
    return [
        keras.layers.Conv2D(8, 3, padding="same"),
        keras.layers.BatchNormalization(epsilon=bn_epsilon),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(16, 3, padding="same"),
        keras.layers.BatchNormalization(epsilon=bn_epsilon),
        keras.layers.ReLU(),
        keras.layers.AveragePooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(NUM_CLASSES),
    ]


class SubclassedTwin(keras.Model):
    """The Keras twin as a subclassed model (no declared inputs; exporters need input_shape)."""

    def __init__(self, stack: list[keras.layers.Layer]):
        super().__init__()
        self.stack = stack

    def call(self, x, training=False):
        for layer in self.stack:
            x = layer(x, training=training)
        return x


def build_keras_twin(
    torch_module: nn.Module, style: KerasStyle = "functional", bn_epsilon: float = BN_EPSILON
) -> keras.Model:
    """A Keras model computing what ``torch_module`` (from :func:`build_torch_twin`) computes,
    on NHWC inputs: ``keras(x.transpose(0, 2, 3, 1)) == torch(x)``. ``bn_epsilon=1e-3`` (Keras'
    default) makes the classic porting mistake, for tests of ``onnxplain compare``."""
    stack = _keras_layers(bn_epsilon)
    if style == "functional":
        inputs = keras.Input(INPUT_SHAPE_NHWC)
        x = inputs
        for layer in stack:
            x = layer(x)
        model = keras.Model(inputs, x)
    elif style == "sequential":
        model = keras.Sequential([keras.Input(INPUT_SHAPE_NHWC), *stack])
    elif style == "subclassed":
        model = SubclassedTwin(stack)
        model(np.zeros((1, *INPUT_SHAPE_NHWC), np.float32))  # creates the weights
    else:
        raise ValueError(f"style must be functional, sequential or subclassed, got {style!r}")
    _copy_weights(torch_module, stack)
    return model


def build_twins(seed: int = 0, keras_style: KerasStyle = "functional") -> tuple[nn.Module, keras.Model]:
    """``(torch_module, keras_model)`` with identical weights; inputs (N, 3, 32, 32) and
    (N, 32, 32, 3), both -> 10 logits."""
    torch_module = build_torch_twin(seed)
    return torch_module, build_keras_twin(torch_module, keras_style)


def _copy_weights(torch_module: nn.Module, stack: list[keras.layers.Layer]) -> None:
    def numpy(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float32)

    pairs = [
        (t, k)
        for t, k in zip(torch_module, stack, strict=True)
        if isinstance(t, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))
    ]
    for t, k in pairs:
        if isinstance(t, nn.Conv2d):
            # OIHW -> HWIO
            k.set_weights([numpy(t.weight).transpose(2, 3, 1, 0), numpy(t.bias)])
        elif isinstance(t, nn.BatchNorm2d):
            k.set_weights([numpy(t.weight), numpy(t.bias), numpy(t.running_mean), numpy(t.running_var)])
        else:
            # torch's features are flattened in (C, H, W) order, Keras's in (H, W, C):
            # reorder the input axis of the kernel, then transpose (out, in) -> (in, out).
            c, h, w = _FEATURES
            weight = numpy(t.weight).reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(-1, c * h * w)
            k.set_weights([weight.T, numpy(t.bias)])
