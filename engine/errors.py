"""onnxplain's error types: one hierarchy, so callers (and the CLI) catch ``OnnxplainError``.

Each keeps the builtin base it always had (ValueError for bad input, RuntimeError for faults), so
code that caught those still works. Messages name the file, node, op, option, shape or value at
fault. The CLI prints one line and exits 1 for any of them (2 for usage, 130 when interrupted).
"""

from __future__ import annotations


class OnnxplainError(Exception):
    """Base of every error onnxplain raises on purpose."""


class InputError(OnnxplainError, ValueError):
    """Bad input to a call: the message names the shape, dtype, value, class or option."""


class ParameterError(InputError, TypeError):
    """An unknown or misspelt parameter name (a TypeError too, as Python raises for bad keywords)."""


class OverwriteError(InputError):
    """An output path that is one of the inputs (same file by inode): nothing is written."""


class ModelFileError(OnnxplainError, ValueError):
    """A model file that onnxplain refuses; the message names the file and the fault."""


class ImageError(OnnxplainError, ValueError):
    """An image file that cannot be used; the message names the file."""


class UnsupportedModelError(OnnxplainError, ValueError):
    """A graph the compiler cannot differentiate; the message names the node and op."""


class LoweringError(OnnxplainError, ValueError):
    """A training op the lowering cannot express in standard ONNX; names the node."""


class BuilderError(OnnxplainError, RuntimeError):
    """The builder interpreter is missing, broken or failed; the message says how to fix it."""


class CacheError(OnnxplainError, RuntimeError):
    """The gradient-model cache cannot be used (unwritable folder, corrupt entry beyond repair)."""


class RuntimeFailure(OnnxplainError, RuntimeError):
    """The ONNX runtime refused or failed a model or a call; wraps its exception."""


__all__ = [
    "OnnxplainError",
    "InputError",
    "ParameterError",
    "OverwriteError",
    "ModelFileError",
    "ImageError",
    "UnsupportedModelError",
    "LoweringError",
    "BuilderError",
    "CacheError",
    "RuntimeFailure",
]
