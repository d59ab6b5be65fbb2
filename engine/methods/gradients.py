"""Single-gradient methods: saliency, gradient × input, guided backprop, DeconvNet.

All return float32 maps shaped like ``x`` (N, *input_shape), per channel, not reduced.
"""

from __future__ import annotations

import numpy as np

from engine.methods.common import Target, prepare
from engine.protocol import ClassifierLike


def saliency(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
    abs: bool = False,
) -> np.ndarray:
    """Vanilla gradient ``∂f_c/∂x`` (Simonyan et al. 2014; spec §1).

    Signed by default like PAIR ``GradientSaliency``; ``abs=True`` gives captum ``Saliency``'s
    default ``|∂f_c/∂x|``.
    """
    x, target = prepare(model, x, target, output)
    _, g = model.gradient(x, target, output=output)
    g = np.asarray(g, dtype=np.float32)
    return np.abs(g) if abs else g


def gradient_x_input(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
) -> np.ndarray:
    """Gradient × input ``x ⊙ ∂f_c/∂x`` (Shrikumar et al. 2016; spec §2), signed, like captum
    ``InputXGradient``."""
    x, target = prepare(model, x, target, output)
    _, g = model.gradient(x, target, output=output)
    return (np.asarray(g, dtype=np.float64) * x).astype(np.float32)


def guided_backprop(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
) -> np.ndarray:
    """Guided backpropagation (Springenberg et al. 2015): ReLU backward passes only positive
    gradients where the forward input was positive. Signed. The rule lives in the gradient graph
    (``model.gradient(rule="guided_backprop")``)."""
    x, target = prepare(model, x, target, output)
    _, g = model.gradient(x, target, output=output, rule="guided_backprop")
    return np.asarray(g, dtype=np.float32)


def deconvnet(
    model: ClassifierLike,
    x: np.ndarray,
    target: Target = None,
    *,
    output: str = "probability",
) -> np.ndarray:
    """DeconvNet (Zeiler & Fergus 2014): ReLU backward is a ReLU of the incoming gradient,
    ignoring the forward mask. Signed. Rule ``model.gradient(rule="deconvnet")``."""
    x, target = prepare(model, x, target, output)
    _, g = model.gradient(x, target, output=output, rule="deconvnet")
    return np.asarray(g, dtype=np.float32)
