"""Framework -> ONNX exporters that prove the file reproduces the framework.

``exporters.torch.export`` and ``exporters.keras.export`` import their framework lazily, so this
package imports neither torch nor TensorFlow.
"""

from exporters._common import ExportParityError, ExportReport, default_tolerance

__all__ = ["ExportParityError", "ExportReport", "default_tolerance"]
