"""The small model protocol that every method and metric talks to.

Methods never see ONNX: they see an object with these members. ``engine.model.Classifier``
implements it on onnxruntime; tests implement it with closed-form numpy models (the way PAIR
saliency tests its core), so each method is checked against analytic gradients.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import numpy as np

Output = Literal["logit", "probability", "log_probability"]
Rule = Literal["gradient", "guided_backprop", "deconvnet"]
OUTPUTS: tuple[str, ...] = ("logit", "probability", "log_probability")
RULES: tuple[str, ...] = ("gradient", "guided_backprop", "deconvnet")


@runtime_checkable
class ClassifierLike(Protocol):
    layout: str | None  # "NCHW", "NHWC", or None for non-image inputs
    input_shape: tuple[int, ...]  # one example, no batch axis
    num_classes: int
    input_range: tuple[float, float]  # (low, high) of valid input values
    batch_size: int | None  # rows per runtime call (None: everything at once)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits, shape (N, K), float32."""
        ...

    def gradient(
        self,
        x: np.ndarray,
        target: int | np.ndarray,
        output: Output = "logit",
        rule: Rule = "gradient",
        *,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, ...]:
        """(scores (N,), d score / d x shaped like x). ``target``: one int, one class per row, or
        class weights (N, K) float (score = Σ_k W[n, k] · output_k).
        ``return_logits``: also the logits (N, K) of the same forward pass, third."""
        ...

    def layer_gradient(
        self,
        x: np.ndarray,
        target: int | np.ndarray,
        output: Output = "logit",
        layer: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores (N,), activation A of ``layer``, d score / d A). ``layer=None``: the last
        convolutional feature map. Used by Grad-CAM."""
        ...
