"""onnxplain engine: explain classifiers stored as ONNX files.

Public surface: ``load`` (a Classifier over onnxruntime), ``explain`` and ``METHODS``,
``evaluate`` and ``METRICS``.
"""

__version__ = "0.1.0"

from .methods import METHODS, explain  # noqa: E402
from .metrics import METRICS, evaluate  # noqa: E402
from .model import Classifier, load  # noqa: E402

__all__ = ["Classifier", "load", "explain", "METHODS", "evaluate", "METRICS", "__version__"]
