"""Evaluation metrics: numpy only, talking to a model through ``engine.protocol.ClassifierLike``.

``evaluate(model, x, attributions, metric, target=None, **params)`` runs one of ``METRICS`` and
returns one ``MetricResult`` per image. Each metric declares ``higher_is_better``, ``needs``
("forward" or "gradient") and ``maps`` (see ``engine.metrics.base.metric``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.checked import check_batch, checked, input_errors
from engine.errors import InputError, ParameterError
from engine.metrics.base import MetricResult, metric
from engine.metrics.causal import deletion, insertion
from engine.metrics.pic import aic, sic
from engine.metrics.pointing import pointing_game

METRICS: dict[str, Callable[..., list[MetricResult]]] = {
    "insertion": insertion,
    "deletion": deletion,
    "sic": sic,
    "aic": aic,
    "pointing_game": pointing_game,
}

from engine.metrics.completeness import completeness  # noqa: E402
from engine.metrics.sanity import model_randomisation, sanity_check  # noqa: E402
from engine.metrics.stability import max_sensitivity, stability  # noqa: E402
from engine.metrics.steps import step_sensitivity  # noqa: E402

METRICS.update(
    completeness=completeness,
    model_randomisation=model_randomisation,
    stability=stability,
    max_sensitivity=max_sensitivity,
)


def metric_parameters(name: str) -> dict[str, Any]:
    """The tunable parameters of a metric and their defaults (the keyword-only ones)."""
    sig = inspect.signature(METRICS[name])
    return {n: p.default for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


def for_method(
    metric: str, params: dict, method: str, method_params: dict, output: str | None = None
) -> dict:
    """A metric's parameters for one method's maps: a metric that re-runs the method (stability,
    max-sensitivity, the sanity checks) runs the one that made the maps, with its parameters."""
    takes = metric_parameters(metric)
    out = dict(params)
    if "method" in takes and "method" not in out:
        out["method"] = method
        if "method_params" in takes and "method_params" not in out:
            out["method_params"] = dict(method_params)
    if output is not None and "output" in takes and "output" not in out:
        out["output"] = output
    return out


def evaluate(
    model: Any,
    x: np.ndarray,
    attributions: np.ndarray | None,
    metric: str,
    *,
    target: Any = None,
    **params: Any,
) -> list[MetricResult]:
    """Score attribution maps of a batch ``x`` with ``metric``; one result per image.

    model: a Classifier (any ClassifierLike) or a path to an ONNX file. attributions: shaped like
    ``x``, or (N, H, W), or at mask resolution where the metric says so. target: None (top-1 on the
    clean image), a class id or one per image. params: the metric's own (``metric_parameters``).
    """
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    known = metric_parameters(metric)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ParameterError(
            f"{metric}() got unknown parameter(s) {', '.join(unknown)}; it takes: {', '.join(known)}"
        )
    if isinstance(model, (str, os.PathLike)):
        from engine.model import load

        model = load(model)
    model = checked(model)
    check_batch(model, x)
    with input_errors(metric):
        return METRICS[metric](model, x, attributions, target, **params)


__all__ = [
    "for_method",
    "METRICS",
    "MetricResult",
    "evaluate",
    "metric",
    "metric_parameters",
    "sanity_check",
    "step_sensitivity",
]
