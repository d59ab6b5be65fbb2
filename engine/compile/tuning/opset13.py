"""Declare opset 13 when every op of the graph means the same there: onnxruntime's NCHWc pass only
rewrites Mul/Add/Relu of opset 13 and older, not the identical opset-14 versions. Runs at compile
time (the portable graph is valid at either opset)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..domains import OPSET13_SAFE, RESIZE_AT_13
from ..graph import GraphContext, attrs, is_standard


def same_at_13(node: onnx.NodeProto, opset: int) -> bool:
    a = attrs(node)
    if not is_standard(node) or node.op_type not in OPSET13_SAFE:
        return False
    if node.op_type == "Reshape" and a.get("allowzero", 0):
        return False
    if node.op_type == "AveragePool" and "dilations" in a:
        return False
    if node.op_type == "Split" and "num_outputs" in a:
        return False
    if node.op_type == "Resize" and (len(node.input) > 3 or set(a) - RESIZE_AT_13):
        return False
    if node.op_type == "Pad" and len(node.input) > 3:  # the axes input arrived in opset 18
        return False
    return True


def lower_opset_to_13(model: onnx.ModelProto, opset: int) -> bool:
    """Declare opset 13 when every op means the same there (see module docstring)."""
    if opset <= 13 or not all(same_at_13(n, opset) for n in model.graph.node):
        return False
    ctx = GraphContext(model, {})
    out = []
    for node in model.graph.node:
        a = attrs(node)
        if node.op_type == "Reshape" and "allowzero" in a:
            keep = [x for x in node.attribute if x.name != "allowzero"]
            del node.attribute[:]
            node.attribute.extend(keep)
        if node.op_type == "Shape" and ("start" in a or "end" in a):  # start/end arrived in 15
            full = ctx.fresh("shape_full")
            starts = ctx.const(np.array([a.get("start", 0)], np.int64), "starts")
            ends = ctx.const(np.array([a.get("end", np.iinfo(np.int64).max)], np.int64), "ends")
            out += [
                helper.make_node("Shape", [node.input[0]], [full], name=node.name + "/full"),
                helper.make_node("Slice", [full, starts, ends], list(node.output), name=node.name),
            ]
            continue
        out.append(node)
    del model.graph.node[:]
    model.graph.node.extend(out)
    model.graph.initializer.extend(ctx.new_initializers)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = 13
    return True
