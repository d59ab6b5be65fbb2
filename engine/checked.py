"""Checks at the boundary between methods/metrics and whatever model they were handed.

``explain`` and ``evaluate`` accept any ``ClassifierLike``; one that returns a gradient without
its batch axis, float64 scores or NaN would otherwise be broadcast into a plausible-looking map.
:class:`CheckedClassifier` validates every answer (shape like the request, floating dtype,
finite) and names the call and the shape at fault. Input batches are checked before any cast:
float64 values beyond float32's range would become Inf after it, and values outside the model's
declared input range get a warning naming the range.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .errors import InputError, OnnxplainError

FLOAT32_MAX = float(np.finfo(np.float32).max)


class InputRangeWarning(UserWarning):
    """Input values outside the model's declared input range (the map may mean little there)."""


def check_float32_range(x: np.ndarray) -> None:
    """Refuse wider floats beyond float32's range before they are cast (they would become Inf)."""
    if x.dtype.kind == "f" and x.dtype.itemsize > 4 and x.size:
        with np.errstate(invalid="ignore"):
            big = np.abs(x) > FLOAT32_MAX
        if big.any():
            first = tuple(int(i) for i in np.argwhere(big)[0])
            raise InputError(
                f"input holds {int(big.sum())} values beyond the float32 range (±{FLOAT32_MAX:.4g}; "
                f"first at index {first}: {x[first]!r})"
            )


def warn_input_range(x: np.ndarray, input_range: Any) -> None:
    """Warn (once per call) when ``x`` leaves ``input_range`` by more than float32 rounding."""
    try:
        lo, hi = (float(v) for v in input_range)
    except (TypeError, ValueError):
        return
    if not x.size or not (np.isfinite(lo) and np.isfinite(hi)):
        return
    slack = 1e-6 * max(hi - lo, 1.0)
    x_lo, x_hi = float(np.nanmin(x)), float(np.nanmax(x))
    if x_lo < lo - slack or x_hi > hi + slack:
        warnings.warn(
            f"input values span [{x_lo:.4g}, {x_hi:.4g}], outside the model's input range "
            f"[{lo:g}, {hi:g}] (scale images to it; see Classifier.input_range)",
            InputRangeWarning,
            stacklevel=4,  # the caller of explain() / evaluate()
        )


def _array(value: Any, what: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise InputError(f"{what} must be a numpy array, got {type(value).__name__}")
    if value.dtype.kind != "f":
        raise InputError(f"{what} must be floating point, got dtype {value.dtype}")
    if not np.isfinite(value).all():
        raise InputError(f"{what} holds {int((~np.isfinite(value)).sum())} NaN/Inf values")
    return value


def _shape(value: np.ndarray, expected: tuple[int, ...], what: str, x: np.ndarray) -> None:
    if value.shape != expected:
        raise InputError(f"{what} has shape {value.shape}; expected {expected} for x of shape {x.shape}")


class CheckedClassifier:
    """A ClassifierLike whose every answer is validated; everything else is forwarded."""

    def __init__(self, model: Any):
        object.__setattr__(self, "_model", model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._model, name, value)

    def _name(self) -> str:
        return type(self._model).__name__

    def predict(self, x: np.ndarray) -> np.ndarray:
        logits = _array(self._model.predict(x), f"{self._name()}.predict()")
        _shape(logits, (len(x), int(self._model.num_classes)), f"{self._name()}.predict()", x)
        return logits

    def gradient(self, x: np.ndarray, target, output="logit", rule="gradient", *, return_logits=False):
        where = f"{self._name()}.gradient()"
        kwargs = {"return_logits": True} if return_logits else {}
        answer = self._model.gradient(x, target, output, rule, **kwargs)
        if not isinstance(answer, tuple) or len(answer) != (3 if return_logits else 2):
            raise InputError(f"{where} must return a tuple of {3 if return_logits else 2} arrays")
        scores = _array(answer[0], f"{where} scores")
        _shape(scores, (len(x),), f"{where} scores", x)
        grads = _array(answer[1], f"{where} gradient")
        _shape(grads, tuple(x.shape), f"{where} gradient", x)
        if return_logits:
            logits = _array(answer[2], f"{where} logits")
            _shape(logits, (len(x), int(self._model.num_classes)), f"{where} logits", x)
        return answer

    def layer_gradient(self, x: np.ndarray, target, output="logit", layer=None):
        where = f"{self._name()}.layer_gradient()"
        answer = self._model.layer_gradient(x, target, output, layer)
        if not isinstance(answer, tuple) or len(answer) != 3:
            raise InputError(f"{where} must return (scores, activation, gradient)")
        scores, act, grad = (
            _array(a, f"{where} {n}") for a, n in zip(answer, ("scores", "activation", "gradient"))
        )
        _shape(scores, (len(x),), f"{where} scores", x)
        if act.shape != grad.shape or act.ndim < 2 or act.shape[0] != len(x):
            raise InputError(
                f"{where} activation {act.shape} and gradient {grad.shape} must match, batch first"
            )
        return answer


def checked(model: Any) -> Any:
    """``model`` wrapped in :class:`CheckedClassifier` (once)."""
    return model if isinstance(model, CheckedClassifier) else CheckedClassifier(model)


def check_batch(model: Any, x: Any) -> None:
    """What explain/evaluate check on a batch before the method's own ``check_input``."""
    x = np.asarray(x)
    check_float32_range(x)
    if x.dtype.kind in "fiu":
        warn_input_range(x, getattr(model, "input_range", None))


@contextmanager
def input_errors(name: str) -> Iterator[None]:
    """Inside a method or metric: a bare ValueError (a bad parameter value) becomes InputError,
    and MemoryError (a request too big for this machine) an InputError that says what to lower."""
    try:
        yield
    except OnnxplainError:
        raise
    except MemoryError as e:
        raise InputError(
            f"{name}: the request does not fit in memory ({e or 'MemoryError'}); use fewer images, "
            "steps, samples or masks, or a smaller ONNXPLAIN_MEMORY_BUDGET"
        ) from e
    except ValueError as e:
        raise InputError(f"{name}: {e}") from e
