"""Attribution methods: numpy only, talking to a model through ``engine.protocol.ClassifierLike``.

``explain(model, x, method, target=None, output="probability", **params)`` runs one of
``METHODS`` on a batch. Each method is ``name(model, x, target, *, output, ...)`` with every
parameter and its default in the signature; see ``specs/methods.md`` for the algorithms.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.checked import check_batch, checked, input_errors
from engine.errors import InputError, ParameterError
from engine.methods.agi import agi
from engine.methods.blur_ig import blur_ig
from engine.methods.common import Target, check_input, check_output
from engine.methods.excitation_backprop import excitation_backprop
from engine.methods.grad_cam import grad_cam
from engine.methods.gradients import deconvnet, gradient_x_input, guided_backprop, saliency
from engine.methods.guided_ig import guided_ig
from engine.methods.igos import igos
from engine.methods.igos_pp import igos_pp
from engine.methods.integrated_gradients import integrated_gradients
from engine.methods.meaningful_perturbation import meaningful_perturbation
from engine.methods.occlusion import occlusion
from engine.methods.rise import rise
from engine.methods.smoothgrad import smoothgrad
from engine.methods.xrai import xrai

METHODS: dict[str, Callable[..., Any]] = {
    "saliency": saliency,
    "gradient_x_input": gradient_x_input,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "blur_ig": blur_ig,
    "guided_ig": guided_ig,
    "agi": agi,
    "guided_backprop": guided_backprop,
    "deconvnet": deconvnet,
    "grad_cam": grad_cam,
    "igos": igos,
    "igos_pp": igos_pp,
    "mask": meaningful_perturbation,
    "rise": rise,
    "occlusion": occlusion,
    "xrai": xrai,
    "excitation_backprop": excitation_backprop,
}


def method_parameters(method: str) -> dict[str, Any]:
    """The tunable parameters of a method and their defaults (everything after ``target``)."""
    sig = inspect.signature(METHODS[method])
    return {name: p.default for name, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


def explain(
    model: Any,
    x: np.ndarray,
    method: str,
    *,
    target: Target = None,
    output: str = "probability",
    **params: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attribution maps for a batch ``x`` (N, *model.input_shape): float32, shaped like ``x``.

    model: a ``Classifier`` (anything implementing ``ClassifierLike``) or a path to an ONNX file
    (loaded with ``engine.model.load``). target: None (top-1 prediction), a class id, or one id
    per image. output: "probability" (softmax), "logit" or "log_probability" — the explained score.
    params: the method's own parameters (``method_parameters(method)``); an unknown name raises
    TypeError. ``return_delta`` (integrated_gradients), ``return_per_class`` (agi) and
    ``return_details`` (igos, igos_pp, mask) make the result a tuple (map, extra).
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    known = method_parameters(method)
    unknown = sorted(set(params) - set(known) - {"output"})
    if unknown:
        raise ParameterError(
            f"{method}() got unknown parameter(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(k for k in known if k != 'output')}"
        )
    check_output(output)
    if isinstance(model, (str, os.PathLike)):
        from engine.model import load  # lazy: methods stay importable without onnxruntime

        model = load(model)
    model = checked(model)
    check_batch(model, x)
    x = check_input(model, x)
    with input_errors(method):
        return METHODS[method](model, x, target, output=output, **params)


__all__ = ["METHODS", "explain", "method_parameters"]
