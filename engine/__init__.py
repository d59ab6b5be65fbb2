"""onnxplain engine: explain classifiers stored as ONNX files.

Public surface: ``load`` (a Classifier over onnxruntime), ``explain`` and ``METHODS``.
"""

__version__ = "0.1.0"

from .model import Classifier, load  # noqa: E402

__all__ = ["Classifier", "load", "__version__"]
try:  # the methods package is optional while it is being written
    from .methods import METHODS, explain  # noqa: E402,F401

    __all__ += ["METHODS", "explain"]
except ImportError:  # pragma: no cover
    pass
