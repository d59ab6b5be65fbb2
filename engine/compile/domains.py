"""The standard-domain and opset facts the compiler relies on, in one place.

Which domains count as standard ONNX, which opsets the builder (onnxruntime-training 1.19.2)
reads, what the lowerings need, where Reduce* ops take their axes, and which ops mean the same
at opset 13 (design/lowering.md, "Opset").
"""

from __future__ import annotations

# Domains of standard ONNX ops; everything else (com.microsoft, ...) is training-only or custom.
STANDARD_DOMAINS = ("", "ai.onnx")
# The opsets GradientGraphBuilder 1.19.2 reads: Softmax semantics changed at 13, 21 is its last.
MIN_OPSET, MAX_OPSET = 13, 21
# ScatterElements(reduction="add"), used by the pooling and gather lowerings, needs opset 16.
TARGET_MIN_OPSET = 16
# The builder (and onnx.checker of older runtimes) reads IR version 10 at most.
MAX_IR_VERSION = 10
# Opset from which a Reduce* op takes its axes as an input instead of an attribute.
REDUCE_AXES_INPUT_SINCE = {"ReduceSum": 13}
REDUCE_AXES_INPUT_DEFAULT = 18


def reduce_axes_are_input(op: str, opset: int) -> bool:
    return opset >= REDUCE_AXES_INPUT_SINCE.get(op, REDUCE_AXES_INPUT_DEFAULT)


OPSET13_SAFE = {
    "Abs",
    "Add",
    "And",
    "AveragePool",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvTranspose",
    "Div",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "HardSigmoid",
    "Greater",
    "Identity",
    "Less",
    "Log",
    "LogSoftmax",
    "MatMul",
    "Max",
    "MaxPool",
    "Min",
    "Mod",
    "Mul",
    "Neg",
    "NonZero",
    "Not",
    "Pow",
    "Range",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Resize",
    "Shape",
    "Sigmoid",
    "Size",
    "Slice",
    "Softmax",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Where",
    "Pad",
    "Split",
}


RESIZE_AT_13 = {"mode", "coordinate_transformation_mode", "nearest_mode", "cubic_coeff_a", "exclude_outside"}
