"""onnxplain engine: explain classifiers stored as ONNX files.

Public surface: ``load`` (a Classifier over onnxruntime), ``explain`` and ``METHODS``,
``evaluate`` and ``METRICS``. Imported lazily (PEP 562), so ``onnxplain --help`` and code that
needs only the numpy parts never pay for importing onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "METHODS": "engine.methods",
    "explain": "engine.methods",
    "METRICS": "engine.metrics",
    "evaluate": "engine.metrics",
    "Classifier": "engine.model",
    "load": "engine.model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:  # a submodule (engine.compile, engine.images, ...) named before anything imported it
        return importlib.import_module(f"engine.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"engine.{name}":
            raise
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["Classifier", "load", "explain", "METHODS", "evaluate", "METRICS", "__version__"]
