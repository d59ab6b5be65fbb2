"""The lowering registry: one function per onnxruntime-training op, keyed by (domain, op type).

A lowering takes the training node and a GraphContext and returns the standard-ONNX nodes that
produce the same output names. Register one with the decorator::

    @lowering("ResizeGrad")            # domain defaults to com.microsoft; "" for ai.onnx ops
    def resize_grad(node, ctx): ...

in a module that ``engine/compile/lowering/__init__.py`` imports.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from ..domains import reduce_axes_are_input
from ..graph import GraphContext

LOWERINGS: dict[tuple[str, str], Callable] = {}


def lowering(op_type: str, domain: str = "com.microsoft"):
    def register(fn):
        LOWERINGS[(domain, op_type)] = fn
        return fn

    return register


def make(op: str, inputs, outputs, **kwargs) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), **kwargs)


def reduction(ctx: GraphContext, op: str, x: str, axes, out: str, keepdims: int = 1) -> onnx.NodeProto:
    """A Reduce* node with ``axes`` as an input or an attribute, whichever the graph's opset takes."""
    if reduce_axes_are_input(op, ctx.opset):
        return make(op, [x, ctx.const(np.array(axes, np.int64), "axes")], [out], keepdims=keepdims)
    return make(op, [x], [out], axes=list(axes), keepdims=keepdims)
