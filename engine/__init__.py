"""onnxplain engine: explain classifiers stored as ONNX files.

Public surface: ``load`` (a Classifier over onnxruntime), ``explain`` and ``METHODS``.
"""

__version__ = "0.1.0"

from .methods import METHODS, explain  # noqa: E402
from .model import Classifier, load  # noqa: E402

__all__ = ["Classifier", "load", "explain", "METHODS", "__version__"]
