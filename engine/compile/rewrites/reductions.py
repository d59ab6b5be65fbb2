"""ReduceMax, ReduceMin and ReduceL1 (no builder gradient) as masked or absolute ReduceSums."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..graph import attrs
from .registry import rewrite


@rewrite("ReduceMax")
def _reduce_max(node, ctx, where, op="ReduceMax"):
    """ReduceMax (and ReduceMin) have no gradient: ReduceSum(x * mask) / count with
    mask = (x == max). Ties share the gradient evenly (torch.amax / amin semantics)."""
    a = attrs(node)
    keepdims = a.get("keepdims", 1)
    axes_inputs = list(node.input[1:2])
    f = ctx.fresh
    mx, eq, mask, masked, num, cnt = f("max"), f("eq"), f("mask"), f("masked"), f("num"), f("count")
    red_kw = {"keepdims": 1}
    reduce_inputs = axes_inputs
    if "axes" in a:  # opset < 18: axes attribute; ReduceSum takes them as an input from 13
        reduce_inputs = [ctx.const(np.array(a["axes"], np.int64), "axes")]
        max_node = helper.make_node(op, [node.input[0]], [mx], axes=a["axes"], keepdims=1)
    else:
        max_node = helper.make_node(op, [node.input[0], *axes_inputs], [mx], keepdims=1)
    nodes = [
        max_node,
        helper.make_node("Equal", [node.input[0], mx], [eq]),
        helper.make_node("Cast", [eq], [mask], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", [node.input[0], mask], [masked]),
        helper.make_node("ReduceSum", [masked, *reduce_inputs], [num], **red_kw),
        helper.make_node("ReduceSum", [mask, *reduce_inputs], [cnt], **red_kw),
    ]
    if keepdims:
        nodes.append(helper.make_node("Div", [num, cnt], [node.output[0]]))
    else:
        div = f("div")
        squeeze_axes = reduce_inputs or []
        nodes.append(helper.make_node("Div", [num, cnt], [div]))
        if squeeze_axes:
            nodes.append(helper.make_node("Squeeze", [div, *squeeze_axes], [node.output[0]]))
        else:  # all axes reduced
            nodes.append(
                helper.make_node("Reshape", [div, ctx.const(np.array([], np.int64))], [node.output[0]])
            )
    return nodes


@rewrite("ReduceMin")
def _reduce_min(node, ctx, where):
    return _reduce_max(node, ctx, where, op="ReduceMin")


@rewrite("ReduceL1")
def _reduce_l1(node, ctx, where):
    """ReduceL1 = ReduceSum(|x|) with the same axes and keepdims (derivative sign(x), 0 at 0)."""
    ab = ctx.fresh("abs")
    a = attrs(node)
    kw = {k: a[k] for k in ("keepdims", "noop_with_empty_axes") if k in a}
    axes_inputs = list(node.input[1:2])
    if "axes" in a:  # opset < 18: an attribute; ReduceSum takes axes as an input from opset 13
        axes_inputs = [ctx.const(np.array(a["axes"], np.int64), "axes")]
    return [
        helper.make_node("Abs", [node.input[0]], [ab]),
        helper.make_node("ReduceSum", [ab, *axes_inputs], [node.output[0]], **kw),
    ]
